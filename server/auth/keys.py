"""API keys: issued once, stored only as SHA-256 digests, compared in constant time.

Guarantees of ``KeyRegistry``: ``create`` returns a fresh ``vk-`` key once and stores only its
digest (a database leak reveals no usable key); it raises ``UserExists`` for a user that has a
key unless ``rotate``, which replaces the key so the old one stops working at once;
``authenticate`` looks the digest up and confirms it with ``hmac.compare_digest``. Creation is
one atomic statement, so two processes creating the same user cannot both succeed. On a shared
(PostgreSQL) store every replica sees the same keys, and a call raises ``StoreUnavailable``
when the database is down. Thread-safe.

Table (component "keys", the same SQL on both dialects)::

    vera_users(user_id, key_sha256, created_at)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from adapters_store import Database, LegacyFile, Sql

KEY_PREFIX = "vk-"

# IF NOT EXISTS: a PostgreSQL database of the previous release already has this table
_TABLE = """
CREATE TABLE IF NOT EXISTS vera_users (
    user_id text PRIMARY KEY,
    key_sha256 text NOT NULL UNIQUE,
    created_at double precision NOT NULL
);
"""
STEPS = {"sqlite": (_TABLE,), "postgresql": (_TABLE,)}
LEGACY = LegacyFile("users.sqlite", {"users": "vera_users"})
_INSERT = "INSERT INTO vera_users (user_id, key_sha256, created_at) VALUES (%s, %s, %s) "
_KEEP = "ON CONFLICT (user_id) DO NOTHING"
_ROTATE = (
    "ON CONFLICT (user_id) DO UPDATE SET key_sha256 = excluded.key_sha256, "
    "created_at = excluded.created_at"
)


class UserExists(Exception):
    """``KeyRegistry.create`` of a user that already has a key, without ``rotate``."""


def key_digest(key: str) -> str:
    """The SHA-256 hex digest under which a key is stored and looked up."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRegistry:
    """user_id -> SHA-256 digest of its API key, in the store's database (see the module
    docstring). User ids were validated at the edge."""

    def __init__(self, db: Database) -> None:
        self._db = db
        db.migrate("keys", STEPS, LEGACY)

    def create(self, user_id: str, rotate: bool = False) -> str:
        """Issue a key for ``user_id`` and return it (the only time it exists in clear)."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        query = _INSERT + (_ROTATE if rotate else _KEEP)
        args = (user_id, key_digest(key), time.time())

        def write(sql: Sql) -> int:
            return sql.execute(query, args).rowcount

        if not self._db.run(write, write=True):
            raise UserExists(f"user {user_id!r} already exists (pass rotate=true for a new key)")
        return key

    def authenticate(self, key: str) -> str | None:
        """The user ``key`` belongs to, or None. Lookup by digest, then a constant-time check."""
        digest = key_digest(key)
        query = "SELECT user_id, key_sha256 FROM vera_users WHERE key_sha256 = %s"
        row = self._db.run(lambda sql: sql.execute(query, (digest,)).fetchone())
        if row is None or not hmac.compare_digest(row[1], digest):
            return None
        return row[0]

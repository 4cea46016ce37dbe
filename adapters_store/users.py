"""API keys: issued once, stored only as SHA-256 digests, compared in constant time.

Guarantees of every ``UserRegistry``: ``create`` returns a fresh ``vk-`` key once and stores
only its digest (a database leak reveals no usable key); it raises ``UserExists`` for a user
that has a key unless ``rotate``, which replaces the key so the old one stops working at once;
``authenticate`` looks the digest up and confirms it with ``hmac.compare_digest``. Creation is
one atomic statement, so two processes creating the same user cannot both succeed. Thread-safe.
``SqliteUsers`` serves one process (beside a ``LocalBackend``); ``PostgresUsers`` shares
``vera_users`` between replicas and raises ``StoreUnavailable`` when the database is down.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path

from psycopg_pool import ConnectionPool

from adapters_store.errors import UserExists
from adapters_store.ids import validate_user_id
from adapters_store.pg_pool import run

KEY_PREFIX = "vk-"


def key_digest(key: str) -> str:
    """The SHA-256 hex digest under which a key is stored and looked up."""
    return hashlib.sha256(key.encode()).hexdigest()


def _new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _on_conflict(rotate: bool) -> str:
    """What an INSERT of an existing user does: replace the key (rotate) or nothing."""
    if rotate:
        return "DO UPDATE SET key_sha256 = excluded.key_sha256, created_at = excluded.created_at"
    return "DO NOTHING"


def _exists(user_id: str) -> UserExists:
    return UserExists(f"user {user_id!r} already exists (pass rotate=true for a new key)")


class UserRegistry(ABC):
    """user_id -> SHA-256 digest of its API key (see the module docstring)."""

    @abstractmethod
    def create(self, user_id: str, rotate: bool = False) -> str:
        """Issue a key for ``user_id`` and return it (the only time it exists in clear)."""

    def authenticate(self, key: str) -> str | None:
        """The user ``key`` belongs to, or None. Lookup by digest, then a constant-time check."""
        digest = key_digest(key)
        row = self._find(digest)
        if row is None or not hmac.compare_digest(row[1], digest):
            return None
        return row[0]

    @abstractmethod
    def close(self) -> None:
        """Release what the registry holds (not a pool it was given)."""

    @abstractmethod
    def _find(self, digest: str) -> tuple[str, str] | None:
        """(user_id, stored digest) of the row indexed by ``digest``, or None."""


class SqliteUsers(UserRegistry):
    """Keys in one SQLite file (WAL), table ``users``; for one server process."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, key_sha256 TEXT NOT NULL,"
            " created_at REAL NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS users_key ON users(key_sha256)")

    def create(self, user_id: str, rotate: bool = False) -> str:
        validate_user_id(user_id)
        key = _new_key()
        sql = f"INSERT INTO users VALUES (?, ?, ?) ON CONFLICT(user_id) {_on_conflict(rotate)}"
        with self._lock:
            changed = self._db.execute(sql, (user_id, key_digest(key), time.time())).rowcount
        if not changed:
            raise _exists(user_id)
        return key

    def _find(self, digest: str) -> tuple[str, str] | None:
        with self._lock:
            return self._db.execute(
                "SELECT user_id, key_sha256 FROM users WHERE key_sha256 = ?", (digest,)
            ).fetchone()

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresUsers(UserRegistry):
    """Keys in ``vera_users`` of the adapter database; ``pool`` comes from
    ``pg_pool.open_pool`` (schema migrated) and stays open on ``close``."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def create(self, user_id: str, rotate: bool = False) -> str:
        validate_user_id(user_id)
        key = _new_key()
        sql = (
            "INSERT INTO vera_users (user_id, key_sha256, created_at) VALUES (%s, %s, %s) "
            f"ON CONFLICT (user_id) {_on_conflict(rotate)}"
        )
        args = (user_id, key_digest(key), time.time())
        if not run(self._pool, lambda conn: conn.execute(sql, args).rowcount, write=True):
            raise _exists(user_id)
        return key

    def _find(self, digest: str) -> tuple[str, str] | None:
        sql = "SELECT user_id, key_sha256 FROM vera_users WHERE key_sha256 = %s"
        return run(self._pool, lambda conn: conn.execute(sql, (digest,)).fetchone())

    def close(self) -> None:
        """Nothing to release: the pool belongs to whoever opened it."""

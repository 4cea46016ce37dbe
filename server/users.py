"""API keys: issued once, stored only as SHA-256 digests, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from pathlib import Path

KEY_PREFIX = "vk-"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class UserExists(Exception):
    pass


class UserRegistry:
    """user_id -> hashed key, in SQLite beside the adapter store."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, key_sha256 TEXT NOT NULL,"
            " created_at REAL NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS users_key ON users(key_sha256)")
        self._lock = threading.Lock()

    def create(self, user_id: str, rotate: bool = False) -> str:
        """Issue a key for ``user_id``; the plain key is returned once and never stored."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            exists = self._db.execute(
                "SELECT 1 FROM users WHERE user_id = ?", (user_id,)
            ).fetchone()
            if exists and not rotate:
                raise UserExists(
                    f"user {user_id!r} already exists (pass rotate=true for a new key)"
                )
            self._db.execute(
                "INSERT OR REPLACE INTO users VALUES (?, ?, ?)",
                (user_id, _digest(key), time.time()),
            )
        return key

    def authenticate(self, key: str) -> str | None:
        """The user a key belongs to, or None. Lookup by digest, then a constant-time check."""
        digest = _digest(key)
        with self._lock:
            row = self._db.execute(
                "SELECT user_id, key_sha256 FROM users WHERE key_sha256 = ?", (digest,)
            ).fetchone()
        if row is None or not hmac.compare_digest(row[1], digest):
            return None
        return row[0]

    def exists(self, user_id: str) -> bool:
        with self._lock:
            return bool(
                self._db.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone()
            )

    def delete(self, user_id: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM users WHERE user_id = ?", (user_id,))
        return cur.rowcount > 0

    def close(self) -> None:
        self._db.close()

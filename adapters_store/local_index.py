"""The local backend's index: one SQLite file (WAL) recording every retained version.

Tables::

    versions(user_id, version, bytes, num_params, sha256, created_at, base_fingerprint,
             retired_at)   -- retired_at IS NULL marks the one current version of a user
    counters(user_id, last_version)  -- survives deletes, so versions are never reused

One connection shared by all threads behind ``self._lock``; every write is one transaction.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from adapters_store.meta import AdapterMeta

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    user_id TEXT NOT NULL, version INTEGER NOT NULL, bytes INTEGER NOT NULL,
    num_params INTEGER NOT NULL, sha256 TEXT NOT NULL, created_at REAL NOT NULL,
    base_fingerprint TEXT NOT NULL, retired_at REAL,
    PRIMARY KEY (user_id, version)
);
CREATE INDEX IF NOT EXISTS versions_retired ON versions (retired_at);
CREATE TABLE IF NOT EXISTS counters (user_id TEXT PRIMARY KEY, last_version INTEGER NOT NULL);
"""
_COLUMNS = "user_id, version, bytes, num_params, sha256, created_at, base_fingerprint"


def _meta(row: tuple) -> AdapterMeta:
    return AdapterMeta(*row[:7])


class SqliteIndex:
    """Thread-safe index of adapter versions. Methods are short transactions; no blob I/O."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # the index commit is the publish point
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(
        self, statements: list[tuple[str, tuple]], durable: bool = True
    ) -> list[list[tuple]]:
        """Run ``statements`` in one IMMEDIATE transaction; return each one's rows.

        ``durable=False`` skips the WAL fsync of this commit (the next durable commit covers it).
        """
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = [self._db.execute(sql, args).fetchall() for sql, args in statements]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")
            return out

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def reserve_version(self, user_id: str) -> int:
        """Claim the user's next version number.

        Not fsync'd on its own: it only has to survive if a file of that version does, and
        then either the version's own (durable) index commit or recovery's ``bump_counter``
        (file renamed, commit lost) records it. A lost reservation was never visible.
        """
        sql = (
            "INSERT INTO counters VALUES (?, 1) ON CONFLICT(user_id) "
            "DO UPDATE SET last_version = last_version + 1 RETURNING last_version"
        )
        return self._write([(sql, (user_id,))], durable=False)[0][0][0]

    def bump_counter(self, user_id: str, version: int) -> None:
        """Make sure the counter is at least ``version`` (recovery)."""
        sql = (
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT(user_id) "
            "DO UPDATE SET last_version = max(last_version, excluded.last_version)"
        )
        self._write([(sql, (user_id, version))])

    def commit_version(self, meta: AdapterMeta, now: float) -> None:
        """Insert ``meta`` as current, retiring the older current row; if a newer version was
        committed meanwhile (concurrent puts), ``meta`` goes in already retired."""
        m = meta
        self._write(
            [
                (
                    "UPDATE versions SET retired_at = ? "
                    "WHERE user_id = ? AND retired_at IS NULL AND version < ?",
                    (now, m.user_id, m.version),
                ),
                (
                    f"INSERT INTO versions ({_COLUMNS}, retired_at) VALUES (?,?,?,?,?,?,?, "
                    "CASE WHEN EXISTS (SELECT 1 FROM versions WHERE user_id = ? "
                    "AND retired_at IS NULL) THEN ? END)",
                    (m.user_id, m.version, m.bytes, m.num_params, m.sha256, m.created_at)
                    + (m.base_fingerprint, m.user_id, now),
                ),
            ]
        )

    def retire_current(self, user_id: str, now: float) -> bool:
        sql = "UPDATE versions SET retired_at = ? WHERE user_id = ? AND retired_at IS NULL"
        with self._lock:
            cur = self._db.execute(sql, (now, user_id))  # autocommit: one statement
            return cur.rowcount > 0

    def current(self, user_id: str) -> AdapterMeta | None:
        rows = self._read(
            f"SELECT {_COLUMNS} FROM versions WHERE user_id = ? AND retired_at IS NULL",
            (user_id,),
        )
        return _meta(rows[0]) if rows else None

    def version(self, user_id: str, version: int) -> AdapterMeta | None:
        rows = self._read(
            f"SELECT {_COLUMNS} FROM versions WHERE user_id = ? AND version = ?",
            (user_id, version),
        )
        return _meta(rows[0]) if rows else None

    def list_current(self) -> list[AdapterMeta]:
        sql = f"SELECT {_COLUMNS} FROM versions WHERE retired_at IS NULL ORDER BY user_id"
        return [_meta(row) for row in self._read(sql)]

    def totals(self) -> tuple[int, int]:
        """(current versions, their bytes)."""
        rows = self._read(
            "SELECT count(*), coalesce(sum(bytes), 0) FROM versions WHERE retired_at IS NULL"
        )
        return int(rows[0][0]), int(rows[0][1])

    def all_rows(self) -> list[tuple[AdapterMeta, float | None]]:
        """Every row with its ``retired_at`` (recovery)."""
        return [
            (_meta(row), row[7])
            for row in self._read(f"SELECT {_COLUMNS}, retired_at FROM versions")
        ]

    def expired(self, before: float, user_id: str | None = None) -> list[tuple[str, int]]:
        """(user_id, version) of rows retired before ``before``."""
        if user_id is None:
            sql, args = "SELECT user_id, version FROM versions WHERE retired_at < ?", (before,)
        else:
            sql = "SELECT user_id, version FROM versions WHERE user_id = ? AND retired_at < ?"
            args = (user_id, before)
        return [(u, v) for u, v in self._read(sql, args)]

    def drop_rows(self, keys: list[tuple[str, int]]) -> None:
        if keys:
            sql = "DELETE FROM versions WHERE user_id = ? AND version = ?"
            self._write([(sql, key) for key in keys])

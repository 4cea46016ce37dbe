"""A directory store's database: one SQLite file, ``<dir>/vera.sqlite``, for one server process.

WAL journal, ``synchronous=FULL`` (a commit is on disk when it returns). One connection shared
by every thread behind a lock; a write is one ``BEGIN IMMEDIATE`` transaction, which also takes
the file's write lock, so two handles on one file (tests, a second tool) stay correct. Reads see
only committed data. ``lock`` needs to do nothing: ``BEGIN IMMEDIATE`` already serializes every
writer. ``notify`` and ``subscribe`` do nothing: nobody else writes the file.

A component's ``LegacyFile`` (a store written before ``vera.sqlite`` kept each component in its
own file) is attached and copied in the transaction that creates the component's tables (right
after the step whose columns it has, before the later steps), then renamed ``<file>.migrated``
after the commit (a crash in between leaves the file, which the next open, seeing the
component recorded, only renames).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from adapters_store.database import (
    ChangeCallback,
    Database,
    LegacyFile,
    Sql,
    Steps,
    T,
    check_not_newer,
    steps_for,
)
from adapters_store.errors import StoreUnavailable

FILE_NAME = "vera.sqlite"
_MIGRATIONS = (
    "CREATE TABLE IF NOT EXISTS vera_migrations (component TEXT NOT NULL, "
    "version INTEGER NOT NULL, applied_at REAL NOT NULL, PRIMARY KEY (component, version))"
)
_LEGACY_SCHEMA = "legacy"  # the name a legacy file is attached under


class _Result:
    """A finished statement: every row fetched at once (SQLite applies a ``RETURNING``
    statement's changes only as its rows are read) and its row count."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._rows = cursor.fetchall()
        self.rowcount = cursor.rowcount

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows


class _SqliteSql:
    """The sqlite3 connection behind the ``Sql`` protocol: ``%s`` placeholders become ``?``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, query: str, params: Sequence[Any] = ()) -> _Result:
        return _Result(self._conn.execute(query.replace("%s", "?"), params))


class SqliteDatabase(Database):
    """``<directory>/vera.sqlite`` (see the module docstring). Thread-safe."""

    dialect = "sqlite"
    exclusive = True

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.description = str(directory)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            str(self.directory / FILE_NAME), isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._sql = _SqliteSql(self._conn)

    def run(self, fn: Callable[[Sql], T], *, write: bool = False, durable: bool = True) -> T:
        with self._lock:
            if not write:
                return fn(self._sql)
            return self._transaction(fn, durable)

    def _transaction(self, fn: Callable[[Sql], T], durable: bool) -> T:
        """``fn`` in one ``BEGIN IMMEDIATE`` transaction; the caller holds ``self._lock``."""
        if not durable:  # the next durable commit fsyncs this one's WAL frames too
            self._conn.execute("PRAGMA synchronous=NORMAL")
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._sql)
            except BaseException:
                if self._conn.in_transaction:  # some errors already ended it
                    self._conn.execute("ROLLBACK")
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as e:  # e.g. an I/O error: the commit may have reached disk
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise StoreUnavailable(
                    f"the store database {self.description} failed to commit ({e}); the write "
                    "may or may not have happened"
                ) from e
            return result
        finally:
            if not durable:
                self._conn.execute("PRAGMA synchronous=FULL")

    def migrate(self, component: str, steps: Steps, legacy: LegacyFile | None = None) -> int:
        todo = steps_for(component, steps, self.dialect)
        source = self.directory / legacy.file if legacy is not None else None
        if source is not None and not source.is_file():
            source = None
        with self._lock:
            if source is not None:  # ATTACH is refused inside a transaction
                self._conn.execute(f"ATTACH DATABASE ? AS {_LEGACY_SCHEMA}", (str(source),))
            try:
                self._transaction(lambda sql: self._apply(sql, component, todo, legacy), True)
            finally:
                if source is not None:
                    self._conn.execute(f"DETACH DATABASE {_LEGACY_SCHEMA}")
        if source is not None:  # imported now, or by an open that crashed before renaming
            _retire_legacy(source)
        return len(todo)

    def _apply(
        self, sql: Sql, component: str, todo: Sequence[str], legacy: LegacyFile | None
    ) -> None:
        sql.execute(_MIGRATIONS)
        row = sql.execute(
            "SELECT coalesce(max(version), 0) FROM vera_migrations WHERE component = %s",
            (component,),
        ).fetchone()
        applied = row[0]
        check_not_newer(component, applied, len(todo))
        importing = applied == 0 and legacy is not None and self._attached()
        for version in range(applied + 1, len(todo) + 1):
            for statement in _statements(todo[version - 1]):
                sql.execute(statement)
            sql.execute(
                "INSERT INTO vera_migrations (component, version, applied_at) VALUES (%s, %s, %s)",
                (component, version, time.time()),
            )
            if importing and legacy is not None and version == legacy.version:
                for old, new in legacy.tables.items():
                    _copy_table(sql, old, new)

    def _attached(self) -> bool:
        names = [row[1] for row in self._conn.execute("PRAGMA database_list").fetchall()]
        return _LEGACY_SCHEMA in names

    def lock(self, sql: Sql, resource: str) -> None:
        """Nothing more: ``BEGIN IMMEDIATE`` already made this the only writer."""

    def json_param(self, value: dict[str, Any] | None) -> str | None:
        return None if value is None else json.dumps(value)

    def json_value(self, value: Any) -> dict[str, Any] | None:
        return None if value is None else json.loads(value)

    def notify(self, sql: Sql, channel: str, payload: str) -> None:
        """Nothing: this process is the only writer and invalidates its own copies."""

    def subscribe(self, channel: str, callback: ChangeCallback) -> None:
        """Nothing to hear: this process is the only writer."""

    def close(self) -> None:
        with self._lock:
            self._conn.close()  # idempotent


def _statements(script: str) -> Iterator[str]:
    """The statements of ``script`` one by one (``executescript`` would COMMIT first)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if any(line.strip() and not line.strip().startswith("--") for line in pending.splitlines()):
        raise ValueError(f"incomplete SQL statement in a migration step: {pending!r}")


def _copy_table(sql: Sql, old: str, new: str) -> None:
    """Copy every row of the attached legacy ``old`` table into ``new`` (same column names)."""
    info = sql.execute(f"PRAGMA {_LEGACY_SCHEMA}.table_info({old})").fetchall()
    columns = [row[1] for row in info]
    if columns:  # a legacy file without this table has nothing to give
        names = ", ".join(columns)
        sql.execute(f"INSERT INTO main.{new} ({names}) SELECT {names} FROM {_LEGACY_SCHEMA}.{old}")


def _retire_legacy(source: Path) -> None:
    """Rename an imported legacy file (and its WAL files) ``<name>.migrated``: kept, not read."""
    for suffix in ("", "-wal", "-shm"):
        path = source.with_name(source.name + suffix)
        with contextlib.suppress(FileNotFoundError):  # another handle renamed it first
            path.rename(path.with_name(f"{source.name}.migrated{suffix}"))

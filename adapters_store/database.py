"""The one handle on a store's database, where every durable record of the server lives.

A store is one database. A directory holds one SQLite file, ``<dir>/vera.sqlite`` (WAL,
``synchronous=FULL``), whose only user is this process (``exclusive``); a ``postgresql://`` URL
is one connection pool on a database that server replicas share. Each component (adapter
versions, their blobs, API keys, fine-tuning jobs) keeps its tables there and writes every
statement once, with psycopg's ``%s`` placeholders: the SQLite handle translates them to ``?``.
Where the dialects really differ, a small hook says it once: ``lock``, ``skip_locked``,
``json_param`` / ``json_value``, ``notify`` / ``subscribe``.

Guarantees of ``run(fn, write=...)``:

* ``write=True``: ``fn`` runs in one transaction that holds the write lock (SQLite: ``BEGIN
  IMMEDIATE``, one writer at a time; PostgreSQL: the row locks it takes, and ``lock``). When
  ``run`` returns, the transaction is committed and durable (``durable=False``: a crash of the
  machine may lose it, but only together with every commit after it). If ``fn`` raises, the
  transaction is rolled back and the exception propagates.
* Any other exception than ``StoreUnavailable`` from a write means nothing was committed. A
  ``StoreUnavailable`` may leave the outcome unknown (the connection died, or the disk failed,
  during COMMIT): the caller reports it and never repeats a non-idempotent write blindly.
* PostgreSQL: ``StoreUnavailable`` within a few seconds when the database is down or
  unreachable; a call on a connection that turned out dead is retried once on a fresh one when
  nothing can have committed, so the first call after a database restart succeeds.

Migrations: ``migrate(component, steps)`` brings a component's tables to the last of its steps
for this dialect. ``vera_migrations(component, version, applied_at)`` records each applied step;
missing steps run in one transaction under the migration lock (PostgreSQL: an advisory lock,
so replicas starting at once apply each step exactly once). A database whose component is newer
than the code is refused (``StoreError``) rather than misread. Append steps; never edit one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from adapters_store.errors import StoreError

T = TypeVar("T")
Dialect = Literal["sqlite", "postgresql"]
Steps = Mapping[str, Sequence[str]]  # dialect -> SQL scripts, oldest first
ChangeCallback = Callable[[str | None], None]

_SCHEMES = ("postgresql:", "postgres:")


class Cursor(Protocol):
    """What a statement gives back: its rows and how many rows it changed."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Sql(Protocol):
    """A connection inside ``Database.run``: statements with ``%s`` placeholders."""

    def execute(self, query: str, params: Sequence[Any] = ...) -> Cursor: ...


@dataclass(frozen=True)
class LegacyFile:
    """Where a directory store written before ``vera.sqlite`` kept a component's rows: the
    SQLite ``file`` in the store directory and its ``tables`` (old name -> new name), whose
    columns are those of the new tables after migration step ``version``. Imported once, right
    after that step, when the component is created (later steps then apply to the imported
    rows too); the file is then renamed ``<file>.migrated``."""

    file: str
    tables: Mapping[str, str]
    version: int = 1


class Database(ABC):
    """A store's database (see the module docstring). Thread-safe."""

    dialect: Dialect
    description: str  # names the database for logs, never with a password
    exclusive: bool  # True: this process is the database's only user (a directory store)
    skip_locked: str = ""  # suffix of a SELECT that claims rows other writers may be claiming

    @abstractmethod
    def run(self, fn: Callable[[Sql], T], *, write: bool = False, durable: bool = True) -> T:
        """``fn(sql)`` on a connection; ``write``: in one transaction holding the write lock."""

    @abstractmethod
    def migrate(self, component: str, steps: Steps, legacy: LegacyFile | None = None) -> int:
        """Apply the missing steps of ``steps[self.dialect]``; return the component's version.
        ``legacy`` (directory stores) is imported once when the tables are first created."""

    @abstractmethod
    def lock(self, sql: Sql, resource: str) -> None:
        """Inside a write: hold the writer lock of ``resource`` (a name) until it ends, so that
        writes naming the same resource run one after the other."""

    def json_param(self, value: dict[str, Any] | None) -> Any:
        """``value`` as the parameter of a JSON column."""
        return value

    def json_value(self, value: Any) -> dict[str, Any] | None:
        """A JSON column's value as a dict."""
        return value

    @abstractmethod
    def notify(self, sql: Sql, channel: str, payload: str) -> None:
        """Inside a write: announce ``payload`` on ``channel`` when (and only if) it commits."""

    @abstractmethod
    def subscribe(self, channel: str, callback: ChangeCallback) -> None:
        """Call ``callback(payload)`` from a background thread for every notification on
        ``channel``, any process's; ``callback(None)`` after notifications may have been
        missed (a reconnect): revalidate everything. No-op where only this process writes."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and threads. Idempotent."""


def is_database_url(location: str | Path) -> bool:
    """True for ``postgresql://...`` and ``postgres://...`` locations."""
    return str(location).startswith(_SCHEMES)


def open_database(location: str | Path) -> Database:
    """The database at ``location``: a store directory (created if needed) or a database URL.

    A database URL must be a ``str`` (a ``Path`` would fold its ``//``). Raises
    StoreUnavailable if the database cannot be reached.
    """
    if is_database_url(location):
        if not isinstance(location, str):
            raise ValueError("a database URL must be passed as a str, not a Path")
        from adapters_store.pg_database import PostgresDatabase

        return PostgresDatabase(location)
    from adapters_store.sqlite_database import SqliteDatabase

    return SqliteDatabase(Path(location))


def steps_for(component: str, steps: Steps, dialect: Dialect) -> Sequence[str]:
    """The component's steps for ``dialect``; a component without any cannot live there."""
    if dialect not in steps:
        raise StoreError(f"the {component!r} tables have no {dialect} schema")
    return steps[dialect]


def check_not_newer(component: str, applied: int, known: int) -> None:
    """Refuse a database that a newer release migrated further than this code knows."""
    if applied > known:
        raise StoreError(
            f"the store's {component!r} tables have schema version {applied}, newer than this "
            f"server's {known}: upgrade vera-serve"
        )

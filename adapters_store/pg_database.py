"""A shared store's database: PostgreSQL through one small pool, for several server replicas.

Every call goes through ``pg_pool.run`` (its retry and ``StoreUnavailable`` rules). ``lock`` is
``pg_advisory_xact_lock`` on a 64-bit hash of the resource name (a collision only serializes
two unrelated writers); ``skip_locked`` is ``FOR UPDATE SKIP LOCKED``; JSON columns are
``jsonb``; ``notify`` is ``pg_notify``, delivered at COMMIT, and ``subscribe`` one LISTEN thread
per channel (``pg_feed.ChangeFeed``).

Migrations run under ``pg_advisory_xact_lock(MIGRATION_LOCK)``, the lock id of the earlier
``vera_schema`` migrations too, so replicas of this and of the previous release starting at
once never migrate together. A database that the previous release migrated (``vera_schema``
versions 1-2) already holds the tables of every component's first step, which is written
``IF NOT EXISTS`` for that reason: it then only records the component as applied.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

import psycopg
from psycopg.types.json import Jsonb

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
from adapters_store.pg_feed import ChangeFeed
from adapters_store.pg_pool import describe, open_pool, run

MIGRATION_LOCK = 0x7665_7261_0001  # "vera" + 1: the advisory lock id of migrations
_MIGRATIONS = (
    "CREATE TABLE IF NOT EXISTS vera_migrations (component text NOT NULL, "
    "version integer NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(), "
    "PRIMARY KEY (component, version))"
)


def lock_id(resource: str) -> int:
    """The advisory lock id of ``resource``: a signed 64-bit hash of its name."""
    digest = hashlib.blake2b(resource.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresDatabase(Database):
    """The database at ``dsn`` (see the module docstring). Thread-safe.

    ``dsn``: ``postgresql://user:password@host:port/dbname`` or a libpq key=value string.
    Raises StoreUnavailable if the database cannot be reached.
    """

    dialect = "postgresql"
    exclusive = False
    skip_locked = " FOR UPDATE SKIP LOCKED"  # claimers skip each other's candidate rows

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.description = describe(dsn)
        self.pool = open_pool(dsn)
        self._feeds: dict[str, ChangeFeed] = {}
        self._feeds_lock = threading.Lock()

    def run(self, fn: Callable[[Sql], T], *, write: bool = False, durable: bool = True) -> T:
        return run(self.pool, fn, write=write, durable=durable)

    def run_pg(self, fn: Callable[[psycopg.Connection], T], *, write: bool = False) -> T:
        """``run`` for PostgreSQL-only code that needs psycopg itself (binary ``bytea``)."""
        return run(self.pool, fn, write=write)

    def migrate(self, component: str, steps: Steps, legacy: LegacyFile | None = None) -> int:
        """See ``Database.migrate``; ``legacy`` concerns directory stores only."""
        todo = steps_for(component, steps, self.dialect)

        def apply(conn: psycopg.Connection) -> int:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(_MIGRATIONS)
            row = conn.execute(
                "SELECT coalesce(max(version), 0) FROM vera_migrations WHERE component = %s",
                (component,),
            ).fetchone()
            applied = row[0] if row else 0
            check_not_newer(component, applied, len(todo))
            for version in range(applied + 1, len(todo) + 1):
                conn.execute(todo[version - 1])  # no parameters: several statements at once
                conn.execute(
                    "INSERT INTO vera_migrations (component, version) VALUES (%s, %s)",
                    (component, version),
                )
            return len(todo)

        return self.run_pg(apply, write=True)

    def lock(self, sql: Sql, resource: str) -> None:
        sql.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id(resource),))

    def json_param(self, value: dict | None) -> Jsonb | None:
        return None if value is None else Jsonb(value)

    def notify(self, sql: Sql, channel: str, payload: str) -> None:
        sql.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def subscribe(self, channel: str, callback: ChangeCallback) -> None:
        with self._feeds_lock:
            feed = self._feeds.get(channel)
            if feed is None:
                feed = self._feeds[channel] = ChangeFeed(self.dsn, channel)
        feed.add(callback)

    def close(self) -> None:
        with self._feeds_lock:
            feeds, self._feeds = list(self._feeds.values()), {}
        for feed in feeds:
            feed.close()
        self.pool.close()  # idempotent

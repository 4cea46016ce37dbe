"""The shared backend: index and blobs in PostgreSQL, for several server replicas at once.

Publish protocol: one transaction (the COMMIT, WAL fsync'd, is the publish point):

1. reserve the version: ``INSERT INTO vera_counters ... ON CONFLICT DO UPDATE ... RETURNING``
   (atomic across processes; it also row-locks the user's counter until COMMIT, so publishes and
   removes of one user are serialized while other users proceed in parallel);
2. write the blob (``BlobStore.put``; with ``PgBlobs`` a row of the same transaction);
3. retire the current row and insert the new one as current (already retired if a newer version
   is current: the rule of the local index, kept although the counter lock makes it moot);
4. delete this user's rows retired more than ``retain_s`` ago and their blobs;
5. ``pg_notify('vera_adapters', user_id)``, delivered to every listener at COMMIT.

A crash or lost connection before COMMIT rolls everything back, the version reservation too
(that version was never visible, so handing it out again is harmless). Reads (``meta``,
``read``, ``list``) are single statements on autocommit connections; ``meta`` is one probe of
the partial unique index on current rows. Recovery has little to repair since blob and row
commit together: it drops rows whose blob is missing or (current rows, when asked) fails its
size or sha256 check, deletes blobs no row names, and collects expired versions.
"""

from __future__ import annotations

import logging
import time

import psycopg
from psycopg_pool import ConnectionPool

from adapters_store.backend import (
    DEFAULT_RETAIN_S,
    AdapterBackend,
    BlobValidator,
    RecoveryReport,
)
from adapters_store.blobs import BlobKey, BlobStore, PgBlobs
from adapters_store.ids import validate_user_id
from adapters_store.meta import AdapterMeta
from adapters_store.pg_feed import Callback, ChangeFeed, notify
from adapters_store.pg_pool import describe, open_pool, run

log = logging.getLogger(__name__)

_COLUMNS = "user_id, version, bytes, num_params, sha256, created_at, base_fingerprint"
_CURRENT = f"SELECT {_COLUMNS} FROM vera_versions WHERE user_id = %s AND retired_at IS NULL"
_VERSION = f"SELECT {_COLUMNS} FROM vera_versions WHERE user_id = %s AND version = %s"
_LIST = f"SELECT {_COLUMNS} FROM vera_versions WHERE retired_at IS NULL ORDER BY user_id"
_RESERVE = (
    "INSERT INTO vera_counters AS c (user_id, last_version) VALUES (%s, 1) "
    "ON CONFLICT (user_id) DO UPDATE SET last_version = c.last_version + 1 "
    "RETURNING last_version"
)
_RETIRE_OLDER = (
    "UPDATE vera_versions SET retired_at = %s "
    "WHERE user_id = %s AND retired_at IS NULL AND version < %s"
)
_INSERT = (
    f"INSERT INTO vera_versions ({_COLUMNS}, retired_at) SELECT %s, %s, %s, %s, %s, %s, %s, "
    "CASE WHEN EXISTS (SELECT 1 FROM vera_versions WHERE user_id = %s AND retired_at IS NULL) "
    "THEN %s::float8 END"
)
_LOCK_USER = "SELECT 1 FROM vera_counters WHERE user_id = %s FOR UPDATE"
_RETIRE = "UPDATE vera_versions SET retired_at = %s WHERE user_id = %s AND retired_at IS NULL"
_EXPIRED_ALL = "DELETE FROM vera_versions WHERE retired_at <= %s RETURNING user_id, version"
_EXPIRED_USER = (
    "DELETE FROM vera_versions WHERE user_id = %s AND retired_at <= %s RETURNING user_id, version"
)
_DROP_ROWS = (
    "DELETE FROM vera_versions WHERE (user_id, version) IN "
    "(SELECT * FROM unnest(%s::text[], %s::bigint[])) RETURNING user_id, version, retired_at"
)


def failpoint(name: str) -> None:
    """No-op in production; crash tests replace it to stop a writer at a named step."""


def _label(key: tuple) -> str:
    return f"{key[0]}/v{key[1]}"


class PostgresBackend(AdapterBackend):
    """Adapter versions in PostgreSQL (see the module docstring). Thread-safe.

    ``dsn``: ``postgresql://user:password@host:port/dbname`` (or a libpq key=value string).
    ``pool``: share a pool made by ``pg_pool.open_pool`` (schema migrated); by default the
    backend opens, migrates and later closes its own. ``blobs``: where bytes go (``PgBlobs``).
    Raises StoreUnavailable if the database cannot be reached.
    """

    def __init__(
        self,
        dsn: str,
        retain_s: float = DEFAULT_RETAIN_S,
        *,
        pool: ConnectionPool | None = None,
        blobs: BlobStore | None = None,
    ) -> None:
        self.dsn = dsn
        self.retain_s = retain_s
        self.description = describe(dsn)
        self._owns_pool = pool is None
        self.pool = open_pool(dsn) if pool is None else pool
        self.blobs: BlobStore = PgBlobs() if blobs is None else blobs
        self._feed = ChangeFeed(dsn)

    def publish(
        self, user_id: str, data: bytes, sha256: str, num_params: int, base_fingerprint: str
    ) -> AdapterMeta:
        validate_user_id(user_id)

        def transaction(conn: psycopg.Connection) -> AdapterMeta:
            version = _one(conn.execute(_RESERVE, (user_id,)))[0]
            self.blobs.put(conn, user_id, version, data)
            failpoint("blob_written")
            now = time.time()
            m = AdapterMeta(user_id, version, len(data), num_params, sha256, now, base_fingerprint)
            conn.execute(_RETIRE_OLDER, (now, user_id, version))
            row = (user_id, version, m.bytes, num_params, sha256, now, base_fingerprint)
            conn.execute(_INSERT, (*row, user_id, now))
            self._collect(conn, now - self.retain_s, user_id)
            notify(conn, user_id)
            return m

        meta = run(self.pool, transaction, write=True)
        failpoint("committed")
        return meta

    def meta(self, user_id: str, version: int | None = None) -> AdapterMeta | None:
        sql, args = (_CURRENT, (user_id,)) if version is None else (_VERSION, (user_id, version))
        row = run(self.pool, lambda conn: conn.execute(sql, args).fetchone())
        return None if row is None else AdapterMeta(*row)

    def read(self, meta: AdapterMeta) -> bytes:
        data = run(self.pool, lambda conn: self.blobs.get(conn, meta.user_id, meta.version))
        if data is None:
            raise FileNotFoundError(f"blob {_label((meta.user_id, meta.version))} was collected")
        return data

    def remove(self, user_id: str) -> bool:
        validate_user_id(user_id)

        def transaction(conn: psycopg.Connection) -> bool:
            conn.execute(_LOCK_USER, (user_id,))  # serialized with this user's publishes
            now = time.time()
            retired = conn.execute(_RETIRE, (now, user_id)).rowcount > 0
            self._collect(conn, now - self.retain_s, user_id)
            if retired:
                notify(conn, user_id)
            return retired

        return run(self.pool, transaction, write=True)

    def list(self) -> list[AdapterMeta]:
        rows = run(self.pool, lambda conn: conn.execute(_LIST).fetchall())
        return [AdapterMeta(*row) for row in rows]

    def totals(self) -> tuple[int, int]:
        sql = "SELECT count(*), coalesce(sum(bytes), 0) FROM vera_versions WHERE retired_at IS NULL"
        row = run(self.pool, lambda conn: conn.execute(sql).fetchone())
        return int(row[0]), int(row[1])

    def collect_garbage(self, user_id: str | None = None) -> int:
        before = time.time() - self.retain_s
        return run(self.pool, lambda conn: self._collect(conn, before, user_id), write=True)

    def recover(self, validate: BlobValidator, verify_checksums: bool = True) -> RecoveryReport:
        """Blob and row commit together, so nothing is adopted (``validate`` is unused)."""

        def transaction(conn: psycopg.Connection) -> RecoveryReport:
            report = RecoveryReport()
            bad, unindexed = self.blobs.audit(conn, verify_checksums)
            dropped = conn.execute(
                _DROP_ROWS, ([k[0] for k in bad], [k[1] for k in bad])
            ).fetchall()
            report.rows_dropped = sorted(_label(r) for r in dropped if r[2] is None)
            report.files_removed = [_label(k) for k in unindexed]
            self.blobs.delete(conn, bad + unindexed)
            return report

        report = run(self.pool, transaction, write=True)
        self.collect_garbage()
        if not report.clean:
            log.warning("adapter database recovered: %s", report)
        return report

    def subscribe(self, callback: Callback) -> None:
        """See ``AdapterBackend.subscribe``; one LISTEN thread (``pg_feed.ChangeFeed``)."""
        self._feed.add(callback)

    def close(self) -> None:
        self._feed.close()
        if self._owns_pool:
            self.pool.close()  # idempotent

    def _collect(self, conn: psycopg.Connection, before: float, user_id: str | None) -> int:
        """Delete rows retired at or before ``before`` and their blobs, in ``conn``'s
        transaction (``<=``: with ``retain_s=0`` the version this publish retires goes too)."""
        if user_id is None:
            cur = conn.execute(_EXPIRED_ALL, (before,))
        else:
            cur = conn.execute(_EXPIRED_USER, (user_id, before))
        keys: list[BlobKey] = [(u, v) for u, v in cur.fetchall()]
        self.blobs.delete(conn, keys)
        return len(keys)


def _one(cur: psycopg.Cursor) -> tuple:
    row = cur.fetchone()
    assert row is not None, "statement returned no row"
    return row

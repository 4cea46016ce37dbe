"""The adapter index: every retained version of every user, on the store's ``Database``.

Tables (component "adapters"; the SQL is written once for both dialects)::

    vera_counters(user_id, last_version, last_committed)
        -- never deleted. last_version: the last version handed out (versions are never
        -- reused); last_committed: the newest version whose index row ever committed, so a
        -- blob above it belongs to a publish that never reached its publish point
    vera_versions(user_id, version, bytes, num_params, sha256, created_at, base_fingerprint,
                  retired_at)
        -- retired_at IS NULL marks the one current version of a user (a unique index)

Each method is one short transaction or one read, and touches no blob. Every write holds the
writer lock of each user whose rows it changes, taken in user order before it touches them:
two writes of one user run one after the other (other users proceed in parallel), and no two
writes ever wait for each other's row locks in a cycle.
"""

from __future__ import annotations

from collections.abc import Iterable

from adapters_store.blobs import BlobKey
from adapters_store.database import Database, LegacyFile, Sql
from adapters_store.meta import AdapterMeta

CHANNEL = "vera_adapters"  # the change feed: payload = the user id whose versions changed

_TABLES = """
CREATE TABLE IF NOT EXISTS vera_counters (
    user_id text PRIMARY KEY,
    last_version bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS vera_versions (
    user_id text NOT NULL,
    version bigint NOT NULL,
    bytes bigint NOT NULL,
    num_params bigint NOT NULL,
    sha256 text NOT NULL,
    created_at double precision NOT NULL,
    base_fingerprint text NOT NULL,
    retired_at double precision,
    PRIMARY KEY (user_id, version)
);
-- meta(user) is one probe of this index; it also forbids two current rows per user
CREATE UNIQUE INDEX IF NOT EXISTS vera_versions_current ON vera_versions (user_id)
    WHERE retired_at IS NULL;
CREATE INDEX IF NOT EXISTS vera_versions_retired ON vera_versions (retired_at)
    WHERE retired_at IS NOT NULL;
"""
# rows of a store from before this column: their newest row is their last committed version
_LAST_COMMITTED = """
ALTER TABLE vera_counters ADD COLUMN last_committed bigint NOT NULL DEFAULT 0;
UPDATE vera_counters SET last_committed = coalesce(
    (SELECT max(version) FROM vera_versions v WHERE v.user_id = vera_counters.user_id), 0);
"""
# Step 1 is IF NOT EXISTS: a PostgreSQL database of the previous release already has it, and
# a directory store's index.sqlite holds its tables (imported right after step 1).
STEPS = {"sqlite": (_TABLES, _LAST_COMMITTED), "postgresql": (_TABLES, _LAST_COMMITTED)}
LEGACY = LegacyFile("index.sqlite", {"versions": "vera_versions", "counters": "vera_counters"})

_COLUMNS = "user_id, version, bytes, num_params, sha256, created_at, base_fingerprint"
_RESERVE = (
    "INSERT INTO vera_counters AS c (user_id, last_version) VALUES (%s, 1) "
    "ON CONFLICT (user_id) DO UPDATE SET last_version = c.last_version + 1 "
    "RETURNING last_version"
)
_RETIRE_OLDER = (
    "UPDATE vera_versions SET retired_at = %s "
    "WHERE user_id = %s AND retired_at IS NULL AND version < %s"
)
_INSERT = (  # current, unless a newer version already is (concurrent publishes)
    f"INSERT INTO vera_versions ({_COLUMNS}, retired_at) VALUES (%s, %s, %s, %s, %s, %s, %s, "
    "CASE WHEN EXISTS (SELECT 1 FROM vera_versions WHERE user_id = %s AND retired_at IS NULL) "
    "THEN CAST(%s AS double precision) END)"
)
_COMMITTED = (
    "UPDATE vera_counters SET last_committed = %s WHERE user_id = %s AND last_committed < %s"
)
_AT_LEAST = (  # recovery: the counter covers an adopted version
    "INSERT INTO vera_counters AS c (user_id, last_version, last_committed) VALUES (%s, %s, %s) "
    "ON CONFLICT (user_id) DO UPDATE SET last_version = CASE WHEN c.last_version < "
    "excluded.last_version THEN excluded.last_version ELSE c.last_version END"
)
_RETIRE = "UPDATE vera_versions SET retired_at = %s WHERE user_id = %s AND retired_at IS NULL"
_EXPIRED = (
    "DELETE FROM vera_versions WHERE retired_at <= %s AND user_id = %s RETURNING user_id, version"
)
_EXPIRED_USERS = "SELECT DISTINCT user_id FROM vera_versions WHERE retired_at <= %s"


def _meta(row: tuple) -> AdapterMeta:
    user_id, version, size, num_params, sha256, created_at, fingerprint = row[:7]
    return AdapterMeta(user_id, version, size, num_params, sha256, created_at, fingerprint)


class VersionIndex:
    """Adapter versions in ``db`` (see the module docstring). Thread-safe."""

    def __init__(self, db: Database) -> None:
        self._db = db
        db.migrate("adapters", STEPS, LEGACY)

    def reserve(self, user_id: str) -> int:
        """Claim the user's next version number, in its own short transaction.

        Not fsync'd on its own: it only has to survive if the version's blob does, and then
        the version's own (durable) index commit or recovery's adoption records it; a lost
        reservation was never visible, so handing its number out again is harmless.
        """

        def write(sql: Sql) -> int:
            return sql.execute(_RESERVE, (user_id,)).fetchone()[0]

        return self._db.run(write, write=True, durable=False)

    def commit(self, meta: AdapterMeta, expire_before: float) -> list[BlobKey]:
        """Make ``meta`` the user's current version (retiring the older current one; already
        retired if a newer one is current), delete the user's rows retired at or before
        ``expire_before`` and announce the change, in one transaction: its COMMIT is the
        publish point. Returns the deleted rows' keys: their blobs are garbage now."""

        def write(sql: Sql) -> list[BlobKey]:
            self._db.lock(sql, f"adapters/{meta.user_id}")
            self._insert(sql, meta, meta.created_at)
            expired = _collect(sql, expire_before, meta.user_id)
            self._db.notify(sql, CHANNEL, meta.user_id)
            return expired

        return self._db.run(write, write=True)

    def retire(self, user_id: str, now: float, expire_before: float) -> tuple[bool, list[BlobKey]]:
        """Retire the user's current version (announced if there was one) and delete the
        user's expired rows; (whether a version was retired, the deleted rows' keys)."""

        def write(sql: Sql) -> tuple[bool, list[BlobKey]]:
            self._db.lock(sql, f"adapters/{user_id}")
            retired = sql.execute(_RETIRE, (now, user_id)).rowcount > 0
            expired = _collect(sql, expire_before, user_id)
            if retired:
                self._db.notify(sql, CHANNEL, user_id)
            return retired, expired

        return self._db.run(write, write=True)

    def collect(self, expire_before: float, user_id: str | None = None) -> list[BlobKey]:
        """Delete rows retired at or before ``expire_before`` (one user's or all); their keys."""

        def write(sql: Sql) -> list[BlobKey]:
            if user_id is None:
                users = [u for (u,) in sql.execute(_EXPIRED_USERS, (expire_before,)).fetchall()]
            else:
                users = [user_id]
            keys: list[BlobKey] = []
            for user in sorted(users):
                self._db.lock(sql, f"adapters/{user}")
                keys += _collect(sql, expire_before, user)
            return keys

        return self._db.run(write, write=True)

    def current(self, user_id: str) -> AdapterMeta | None:
        query = f"SELECT {_COLUMNS} FROM vera_versions WHERE user_id = %s AND retired_at IS NULL"
        row = self._db.run(lambda sql: sql.execute(query, (user_id,)).fetchone())
        return None if row is None else _meta(row)

    def version(self, user_id: str, version: int) -> AdapterMeta | None:
        query = f"SELECT {_COLUMNS} FROM vera_versions WHERE user_id = %s AND version = %s"
        row = self._db.run(lambda sql: sql.execute(query, (user_id, version)).fetchone())
        return None if row is None else _meta(row)

    def list_current(self) -> list[AdapterMeta]:
        query = f"SELECT {_COLUMNS} FROM vera_versions WHERE retired_at IS NULL ORDER BY user_id"
        return [_meta(row) for row in self._db.run(lambda sql: sql.execute(query).fetchall())]

    def totals(self) -> tuple[int, int]:
        """(current versions, their bytes): one aggregate query."""
        query = (
            "SELECT count(*), coalesce(sum(bytes), 0) FROM vera_versions WHERE retired_at IS NULL"
        )
        row = self._db.run(lambda sql: sql.execute(query).fetchone())
        return int(row[0]), int(row[1])

    # recovery

    def rows(self) -> list[tuple[AdapterMeta, float | None]]:
        """Every row with its ``retired_at``."""
        query = f"SELECT {_COLUMNS}, retired_at FROM vera_versions"
        return [(_meta(r), r[7]) for r in self._db.run(lambda sql: sql.execute(query).fetchall())]

    def last_committed(self) -> dict[str, int]:
        query = "SELECT user_id, last_committed FROM vera_counters"
        return dict(self._db.run(lambda sql: sql.execute(query).fetchall()))

    def indexed(self, keys: Iterable[BlobKey]) -> set[BlobKey]:
        """Those of ``keys`` that have a row now."""
        query = "SELECT 1 FROM vera_versions WHERE user_id = %s AND version = %s"
        keys = list(keys)
        return self._db.run(lambda sql: {k for k in keys if sql.execute(query, k).fetchone()})

    def drop(self, keys: Iterable[BlobKey]) -> list[tuple[BlobKey, float | None]]:
        """Delete these rows; (key, retired_at) of each row that existed."""
        query = "DELETE FROM vera_versions WHERE user_id = %s AND version = %s RETURNING retired_at"
        keys = list(keys)

        def write(sql: Sql) -> list[tuple[BlobKey, float | None]]:
            for user_id in sorted({k[0] for k in keys}):  # in order: never a lock cycle
                self._db.lock(sql, f"adapters/{user_id}")
            dropped = [(k, sql.execute(query, k).fetchall()) for k in keys]
            return [(k, rows[0][0]) for k, rows in dropped if rows]

        return self._db.run(write, write=True) if keys else []

    def adopt(self, meta: AdapterMeta, now: float) -> None:
        """Index a complete blob whose publish crashed before its index commit: counters
        moved past it, row inserted as ``commit`` would have."""

        def write(sql: Sql) -> None:
            self._db.lock(sql, f"adapters/{meta.user_id}")
            sql.execute(_AT_LEAST, (meta.user_id, meta.version, 0))
            self._insert(sql, meta, now)

        self._db.run(write, write=True)

    def _insert(self, sql: Sql, meta: AdapterMeta, now: float) -> None:
        m = meta
        sql.execute(_RETIRE_OLDER, (now, m.user_id, m.version))
        row = (m.user_id, m.version, m.bytes, m.num_params, m.sha256, m.created_at)
        sql.execute(_INSERT, (*row, m.base_fingerprint, m.user_id, now))
        sql.execute(_COMMITTED, (m.version, m.user_id, m.version))


def _collect(sql: Sql, before: float, user_id: str) -> list[BlobKey]:
    """Delete the user's rows retired at or before ``before`` (``<=``: with no retention, the
    version a publish retires goes at once); their keys. The caller holds the user's lock."""
    rows = sql.execute(_EXPIRED, (before, user_id)).fetchall()
    return [(u, v) for u, v in rows]

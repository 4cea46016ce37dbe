"""Adapter bytes in the PostgreSQL store: table ``vera_blobs`` (component "blobs").

Each call is its own short transaction: ``put`` commits before it returns (durable: the WAL is
fsync'd), and nothing holds a connection between calls, so reading a blob never pins one while
the caller works. ``bytea`` travels in binary (no hex escaping); ``checksums`` hashes in the
database (``sha256(data)``) without sending the bytes; ``stored_at`` (the database's clock)
gives ``scan`` its ages, so replicas' clocks need not agree.

Table::

    vera_blobs(user_id, version, data, stored_at)  -- data: the safetensors bytes
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import psycopg

from adapters_store.blobs import BlobKey, StoredBlob
from adapters_store.pg_database import PostgresDatabase

STEPS = {
    "postgresql": (
        # written IF NOT EXISTS: a database of the previous release already has this table
        """
        CREATE TABLE IF NOT EXISTS vera_blobs (
            user_id text NOT NULL,
            version bigint NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (user_id, version)
        );
        -- float32 vectors do not compress: store them out of line without trying
        ALTER TABLE vera_blobs ALTER COLUMN data SET STORAGE EXTERNAL;
        """,
        # blobs are written before their index row now: recovery needs their age
        "ALTER TABLE vera_blobs ADD COLUMN stored_at timestamptz NOT NULL DEFAULT now();",
    )
}
_UNNEST = "(SELECT * FROM unnest(%s::text[], %s::bigint[]))"


def _columns(keys: Iterable[BlobKey]) -> tuple[list[str], list[int]]:
    """Keys as the two arrays ``_UNNEST`` takes."""
    keys = list(keys)
    return [k[0] for k in keys], [k[1] for k in keys]


class PgBlobs:
    """Blobs in ``vera_blobs`` of ``db`` (see the module docstring). Thread-safe."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db
        db.migrate("blobs", STEPS)

    def put(self, user_id: str, version: int, data: bytes) -> None:
        def insert(conn: psycopg.Connection) -> None:
            conn.execute(  # %b: sent in binary, no hex escaping of the payload
                "INSERT INTO vera_blobs (user_id, version, data) VALUES (%s, %s, %b) "
                "ON CONFLICT (user_id, version) DO UPDATE SET data = excluded.data, "
                "stored_at = now()",  # a version whose publish never committed, handed out again
                (user_id, version, data),
            )

        self._db.run_pg(insert, write=True)

    def get(self, user_id: str, version: int) -> bytes | None:
        def select(conn: psycopg.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT data FROM vera_blobs WHERE user_id = %s AND version = %s",
                (user_id, version),
                binary=True,
            ).fetchone()
            return None if row is None else bytes(row[0])

        return self._db.run_pg(select)

    def delete(self, keys: Sequence[BlobKey]) -> None:
        if keys:
            sql = f"DELETE FROM vera_blobs WHERE (user_id, version) IN {_UNNEST}"
            self._db.run_pg(lambda conn: conn.execute(sql, _columns(keys)), write=True)

    def scan(self) -> list[StoredBlob]:
        # length() of a bytea stored EXTERNAL reads its header only
        sql = (
            "SELECT user_id, version, length(data), extract(epoch FROM now() - stored_at) "
            "FROM vera_blobs"
        )
        rows = self._db.run_pg(lambda conn: conn.execute(sql).fetchall())
        return [StoredBlob((u, v), size, float(age)) for u, v, size, age in rows]

    def checksums(self, keys: Iterable[BlobKey]) -> dict[BlobKey, str]:
        sql = (
            "SELECT user_id, version, encode(sha256(data), 'hex') FROM vera_blobs "
            f"WHERE (user_id, version) IN {_UNNEST}"
        )
        rows = self._db.run_pg(lambda conn: conn.execute(sql, _columns(keys)).fetchall())
        return {(u, v): digest for u, v, digest in rows}

    def sweep_partial(self, older_than_s: float) -> list[str]:
        """Nothing: a put is one transaction, so an interrupted one left nothing."""
        return []

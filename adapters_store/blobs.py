"""Where ``PostgresBackend`` keeps adapter bytes: the seam an object store would replace.

``PgBlobs`` (the default) stores each version as a ``bytea`` row of ``vera_blobs`` written in the
caller's transaction, so a blob and its index row commit or vanish together. An S3-compatible
store would implement the same four methods, ignoring ``conn`` (see ``adapters_store.backend``
for the publish order that keeps the index commit the publish point).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import psycopg

BlobKey = tuple[str, int]  # (user_id, version)


class BlobStore(Protocol):
    """Versioned blobs addressed by ``(user_id, version)``; each key is written at most once."""

    def put(self, conn: psycopg.Connection, user_id: str, version: int, data: bytes) -> None:
        """Store ``data`` (durable when the caller's transaction commits, or on return)."""

    def get(self, conn: psycopg.Connection, user_id: str, version: int) -> bytes | None:
        """The blob, or None if it does not exist (collected)."""

    def delete(self, conn: psycopg.Connection, keys: Sequence[BlobKey]) -> None:
        """Delete these blobs; missing ones are ignored."""

    def audit(
        self, conn: psycopg.Connection, verify_checksums: bool
    ) -> tuple[list[BlobKey], list[BlobKey]]:
        """(index rows whose blob is missing, has the wrong size, or, for current rows with
        ``verify_checksums``, the wrong sha256; blobs that no index row names)."""


class PgBlobs:
    """Blobs in ``vera_blobs``, inside the caller's transaction. Stateless, thread-safe."""

    def put(self, conn: psycopg.Connection, user_id: str, version: int, data: bytes) -> None:
        conn.execute(  # %b: sent in binary, no hex escaping of the payload
            "INSERT INTO vera_blobs (user_id, version, data) VALUES (%s, %s, %b)",
            (user_id, version, data),
        )

    def get(self, conn: psycopg.Connection, user_id: str, version: int) -> bytes | None:
        row = conn.execute(
            "SELECT data FROM vera_blobs WHERE user_id = %s AND version = %s",
            (user_id, version),
            binary=True,
        ).fetchone()
        return None if row is None else bytes(row[0])

    def delete(self, conn: psycopg.Connection, keys: Sequence[BlobKey]) -> None:
        if keys:
            conn.execute(
                "DELETE FROM vera_blobs WHERE (user_id, version) IN "
                "(SELECT * FROM unnest(%s::text[], %s::bigint[]))",
                ([k[0] for k in keys], [k[1] for k in keys]),
            )

    def audit(
        self, conn: psycopg.Connection, verify_checksums: bool
    ) -> tuple[list[BlobKey], list[BlobKey]]:
        # length() of a bytea reads its header only; sha256() runs in the server: no transfer
        bad = conn.execute(
            "SELECT v.user_id, v.version FROM vera_versions v "
            "LEFT JOIN vera_blobs b USING (user_id, version) "
            "WHERE b.data IS NULL OR length(b.data) <> v.bytes OR (%s AND v.retired_at IS NULL "
            "AND encode(sha256(b.data), 'hex') <> v.sha256) ORDER BY 1, 2",
            (verify_checksums,),
        ).fetchall()
        unindexed = conn.execute(
            "SELECT b.user_id, b.version FROM vera_blobs b "
            "LEFT JOIN vera_versions v USING (user_id, version) "
            "WHERE v.user_id IS NULL ORDER BY 1, 2"
        ).fetchall()
        return [(u, v) for u, v in bad], [(u, v) for u, v in unindexed]

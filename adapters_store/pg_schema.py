"""The adapter database's tables, created or migrated on first start.

``migrate`` is idempotent and safe when several replicas start at once: it runs in one
transaction holding ``pg_advisory_xact_lock(SCHEMA_LOCK)``, reads the applied version from
``vera_schema`` and applies only the missing steps of ``MIGRATIONS`` (append new steps; never
edit an applied one). A database newer than this code is refused rather than misread.

Tables (all prefixed ``vera_``)::

    vera_counters(user_id, last_version)   -- never deleted: versions are never reused
    vera_versions(user_id, version, bytes, num_params, sha256, created_at, base_fingerprint,
                  retired_at)              -- retired_at IS NULL marks the one current version
    vera_blobs(user_id, version, data)     -- the safetensors bytes (``PgBlobs``)
    vera_users(user_id, key_sha256, created_at)  -- API keys, stored only as SHA-256 digests
"""

from __future__ import annotations

import psycopg

from adapters_store.errors import StoreError

SCHEMA_LOCK = 0x7665_7261_0001  # "vera" + 1: the advisory lock id of migrations

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE vera_counters (
        user_id text PRIMARY KEY,
        last_version bigint NOT NULL
    );
    CREATE TABLE vera_versions (
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
    CREATE UNIQUE INDEX vera_versions_current ON vera_versions (user_id) WHERE retired_at IS NULL;
    CREATE INDEX vera_versions_retired ON vera_versions (retired_at) WHERE retired_at IS NOT NULL;
    CREATE TABLE vera_blobs (
        user_id text NOT NULL,
        version bigint NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (user_id, version)
    );
    -- float32 vectors do not compress: store them out of line without trying
    ALTER TABLE vera_blobs ALTER COLUMN data SET STORAGE EXTERNAL;
    CREATE TABLE vera_users (
        user_id text PRIMARY KEY,
        key_sha256 text NOT NULL UNIQUE,
        created_at double precision NOT NULL
    );
    """,
)


def migrate(conn: psycopg.Connection) -> int:
    """Bring the schema to ``len(MIGRATIONS)``; return that version. ``conn`` is autocommit."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS vera_schema (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM vera_schema").fetchone()
        current = row[0] if row else 0
        if current > len(MIGRATIONS):
            raise StoreError(
                f"the adapter database has schema version {current}, newer than this server's "
                f"{len(MIGRATIONS)}: upgrade vera-serve"
            )
        for version in range(current + 1, len(MIGRATIONS) + 1):
            conn.execute(MIGRATIONS[version - 1])
            conn.execute("INSERT INTO vera_schema (version) VALUES (%s)", (version,))
    return len(MIGRATIONS)

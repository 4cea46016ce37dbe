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
    vera_files(seq, id, user_id, filename, purpose, bytes, created_at, data)
                                           -- fine-tuning uploads (``training.py``)
    vera_jobs(seq, id, user_id, model, training_file, ..., status, attempts, owner,
              heartbeat_at, cancel_requested, event_seq)  -- fine-tuning jobs, any replica's
    vera_job_events(id, job_id, seq, created_at, level, message, type, data)  -- their logs

``seq`` of files and jobs is insertion order (ties of their one-second ``created_at``).
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
    """
    CREATE TABLE vera_files (
        seq bigint GENERATED ALWAYS AS IDENTITY,
        id text PRIMARY KEY,
        user_id text NOT NULL,
        filename text NOT NULL,
        purpose text NOT NULL,
        bytes bigint NOT NULL,
        created_at bigint NOT NULL,
        data bytea NOT NULL
    );
    CREATE INDEX vera_files_user ON vera_files (user_id, created_at, seq);
    CREATE TABLE vera_jobs (
        seq bigint GENERATED ALWAYS AS IDENTITY,
        id text PRIMARY KEY,
        user_id text NOT NULL,
        model text NOT NULL,
        training_file text NOT NULL,
        validation_file text,
        hyperparameters jsonb NOT NULL,
        suffix text,
        status text NOT NULL
            CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
        created_at bigint NOT NULL,
        started_at bigint,
        finished_at bigint,
        error jsonb,
        fine_tuned_model text,
        trained_tokens bigint,
        result jsonb,
        attempts integer NOT NULL,
        owner text,
        heartbeat_at double precision,
        cancel_requested boolean NOT NULL,
        event_seq bigint NOT NULL DEFAULT 0
    );
    CREATE INDEX vera_jobs_user ON vera_jobs (user_id, created_at, seq);
    CREATE INDEX vera_jobs_order ON vera_jobs (created_at, seq);
    -- claim scans only the jobs not yet finished, oldest first
    CREATE INDEX vera_jobs_active ON vera_jobs (created_at, seq)
        WHERE status IN ('queued', 'running');
    CREATE TABLE vera_job_events (
        id text PRIMARY KEY,
        job_id text NOT NULL REFERENCES vera_jobs (id),
        seq bigint NOT NULL,
        created_at bigint NOT NULL,
        level text NOT NULL,
        message text NOT NULL,
        type text NOT NULL,
        data jsonb,
        UNIQUE (job_id, seq)
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

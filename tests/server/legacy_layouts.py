"""The layouts the previous release wrote, copied verbatim from its code: upgrade tests build
stores with them (a directory of three SQLite files and adapter files, or a PostgreSQL database
migrated to ``vera_schema`` version 2)."""

from __future__ import annotations

# index.sqlite (adapters_store/local_index.py)
LEGACY_INDEX = """
CREATE TABLE IF NOT EXISTS versions (
    user_id TEXT NOT NULL, version INTEGER NOT NULL, bytes INTEGER NOT NULL,
    num_params INTEGER NOT NULL, sha256 TEXT NOT NULL, created_at REAL NOT NULL,
    base_fingerprint TEXT NOT NULL, retired_at REAL,
    PRIMARY KEY (user_id, version)
);
CREATE INDEX IF NOT EXISTS versions_retired ON versions (retired_at);
CREATE TABLE IF NOT EXISTS counters (user_id TEXT PRIMARY KEY, last_version INTEGER NOT NULL);
"""

# users.sqlite (adapters_store/users.py)
LEGACY_USERS = """
CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, key_sha256 TEXT NOT NULL,
 created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS users_key ON users(key_sha256);
"""

# training.sqlite (adapters_store/training.py)
LEGACY_TRAINING = """
CREATE TABLE IF NOT EXISTS vera_files (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL,
    filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS vera_files_user ON vera_files (user_id, created_at, seq);
CREATE TABLE IF NOT EXISTS vera_jobs (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL,
    model TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT,
    hyperparameters TEXT NOT NULL, suffix TEXT, status TEXT NOT NULL CHECK (status IN
    ('queued', 'running', 'succeeded', 'failed', 'cancelled')), created_at INTEGER NOT NULL,
    started_at INTEGER, finished_at INTEGER, error TEXT, fine_tuned_model TEXT,
    trained_tokens INTEGER, result TEXT, attempts INTEGER NOT NULL, owner TEXT,
    heartbeat_at REAL, cancel_requested INTEGER NOT NULL, event_seq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS vera_jobs_user ON vera_jobs (user_id, created_at, seq);
CREATE INDEX IF NOT EXISTS vera_jobs_order ON vera_jobs (created_at, seq);
CREATE TABLE IF NOT EXISTS vera_job_events (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL REFERENCES vera_jobs (id), seq INTEGER NOT NULL,
    created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL,
    data TEXT, UNIQUE (job_id, seq)
);
"""


# PostgreSQL, applied in order and recorded in vera_schema (adapters_store/pg_schema.py)
LEGACY_PG: tuple[str, ...] = (
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

"""What the fine-tuning store holds: uploaded files, jobs and the lines of their logs, as
records and as the tables that keep them (component "jobs", one schema per dialect).

Tables::

    vera_files(seq, id, user_id, filename, purpose, bytes, created_at, data)
    vera_jobs(seq, id, user_id, model, training_file, ..., status, attempts, owner,
              heartbeat_at, cancel_requested, event_seq)
    vera_job_events(id, job_id, seq, created_at, level, message, type, data)

``seq`` of files and jobs is insertion order (ties of their one-second ``created_at``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from adapters_store import LegacyFile

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


def new_id(prefix: str) -> str:
    """``prefix`` + 24 URL-safe random characters (144 bits): ``new_id("file-")``."""
    return prefix + secrets.token_urlsafe(18)


@dataclass(frozen=True)
class FileRecord:
    """An uploaded file, without its content (``JobStore.file_content``)."""

    id: str  # "file-" + 24 random characters
    user_id: str
    filename: str
    purpose: str  # e.g. "fine-tune"
    bytes: int
    created_at: int  # unix seconds


@dataclass(frozen=True)
class JobRecord:
    """A fine-tuning job. JSON fields hold JSON-serializable dicts."""

    id: str  # "ftjob-" + 24 random characters
    user_id: str  # whose adapter it trains
    model: str  # base model name
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    suffix: str | None
    status: str  # "queued" | "running" | one of TERMINAL
    created_at: int  # unix seconds, like started_at and finished_at
    started_at: int | None  # first claim
    finished_at: int | None
    error: dict[str, Any] | None  # {"code": ..., "message": ..., "param": ...}
    fine_tuned_model: str | None
    trained_tokens: int | None
    result: dict[str, Any] | None  # free JSON of the trainer (adapter version, losses, ...)
    attempts: int  # how many times a worker claimed it
    owner: str | None  # the worker holding it while running
    heartbeat_at: float | None  # time.time() of the owner's last heartbeat
    cancel_requested: bool


@dataclass(frozen=True)
class JobEvent:
    """One line of a job's log: a message or metrics."""

    id: str  # "ftevent-" + 24 random characters
    job_id: str
    seq: int  # 1, 2, ... per job
    created_at: int
    level: str  # "info" | "warn" | "error"
    message: str
    type: str  # "message" | "metrics"
    data: dict[str, Any] | None


_SQLITE_TABLES = """
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
# IF NOT EXISTS: a PostgreSQL database of the previous release already has these tables
_POSTGRES_TABLES = """
CREATE TABLE IF NOT EXISTS vera_files (
    seq bigint GENERATED ALWAYS AS IDENTITY,
    id text PRIMARY KEY,
    user_id text NOT NULL,
    filename text NOT NULL,
    purpose text NOT NULL,
    bytes bigint NOT NULL,
    created_at bigint NOT NULL,
    data bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS vera_files_user ON vera_files (user_id, created_at, seq);
CREATE TABLE IF NOT EXISTS vera_jobs (
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
CREATE INDEX IF NOT EXISTS vera_jobs_user ON vera_jobs (user_id, created_at, seq);
CREATE INDEX IF NOT EXISTS vera_jobs_order ON vera_jobs (created_at, seq);
-- claim scans only the jobs not yet finished, oldest first
CREATE INDEX IF NOT EXISTS vera_jobs_active ON vera_jobs (created_at, seq)
    WHERE status IN ('queued', 'running');
CREATE TABLE IF NOT EXISTS vera_job_events (
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
"""
STEPS = {"sqlite": (_SQLITE_TABLES,), "postgresql": (_POSTGRES_TABLES,)}
TABLES = ("vera_files", "vera_jobs", "vera_job_events")
LEGACY = LegacyFile("training.sqlite", {table: table for table in TABLES})

"""Fine-tuning files, jobs and job events in the store's database, shared by replicas.

Guarantees of ``JobStore`` (one SQL text for both dialects):

* Each method is one transaction; what it returned is committed (SQLite WAL, PostgreSQL COMMIT)
  and survives a restart. Jobs are never deleted; files are (a job keeps only their id).
* A job moves queued -> running -> succeeded | failed | cancelled, running -> queued
  (``requeue``) and queued -> cancelled (``request_cancel``). Terminal states are final, and
  ``heartbeat``, ``finish(owner=...)`` and ``requeue`` act only for the worker that owns the job.
* ``create_job`` counts non-terminal jobs and inserts under one writer lock (``Database.lock``:
  SQLite's ``BEGIN IMMEDIATE``, PostgreSQL an advisory lock): concurrent creators, in one
  process or in several replicas, never exceed a limit.
* ``claim`` gives a job to exactly one worker (PostgreSQL ``FOR UPDATE SKIP LOCKED``, SQLite the
  file's write lock): the oldest queued job, or a running one whose heartbeat is older than
  ``stale_s`` (its worker died: the job resumes, ``attempts`` + 1). A stale job that was asked to
  cancel is cancelled instead of resumed. A claim whose COMMIT was lost leaves a running job
  nobody heartbeats, so it is claimed again after ``stale_s``.
* Event ``seq`` of a job counts 1, 2, ... without gaps or repeats (a counter in the job's row).
* Newest first means ``created_at`` descending, then insertion order descending (ids are random,
  and ``created_at`` has one-second resolution); ``claim`` takes the opposite order.

Timestamps come from the caller's clock (``created_at`` etc. in unix seconds, ``heartbeat_at`` a
``time.time()`` float): replicas' clocks must agree to well within ``stale_s``. On PostgreSQL a
call raises ``StoreUnavailable`` when the database is down. User ids were validated at the edge.
The tables are in ``records``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import astuple, fields
from typing import Any

from adapters_store import Database, Sql, StoreError
from server.finetune.records import (
    LEGACY,
    STEPS,
    TERMINAL,
    FileRecord,
    JobEvent,
    JobRecord,
    new_id,
)

_LEVELS = frozenset({"info", "warn", "error"})
_EVENT_TYPES = frozenset({"message", "metrics"})


class JobLimit(Exception):
    """``JobStore.create_job`` refused: too many queued or running fine-tuning jobs, in the
    whole store or for this user. Transient: retry once some job has finished."""


def _now() -> int:
    return int(time.time())


def _insert(table: str, record: type, *extra: str) -> str:
    """INSERT of a row holding ``record``'s fields (the columns of the same names) + ``extra``."""
    names = [f.name for f in fields(record)] + list(extra)
    return f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))})"


_JOB_FIELDS = tuple(f.name for f in fields(JobRecord))
_JSON_FIELDS = ("hyperparameters", "error", "result")
_UNSET_WHEN_QUEUED = (  # None in a new job
    "started_at", "finished_at", "error", "fine_tuned_model", "trained_tokens", "result",
    "owner", "heartbeat_at",
)  # fmt: skip
_FILE_COLS, _JOB_COLS, _EVENT_COLS = (
    ", ".join(f.name for f in fields(record)) for record in (FileRecord, JobRecord, JobEvent)
)
_ACTIVE = "status IN ('queued', 'running')"
_INSERT_FILE = _insert("vera_files", FileRecord, "data")
_INSERT_JOB = _insert("vera_jobs", JobRecord)
_INSERT_EVENT = _insert("vera_job_events", JobEvent)
_GET_JOB = f"SELECT {_JOB_COLS} FROM vera_jobs WHERE id = %s"
_NEXT = (  # the job to claim: id, cancel_requested
    "SELECT id, cancel_requested FROM vera_jobs WHERE status = 'queued' "
    "OR (status = 'running' AND heartbeat_at < %s) ORDER BY created_at, seq LIMIT 1"
)
_CLAIM = (
    "UPDATE vera_jobs SET status = 'running', owner = %s, heartbeat_at = %s, "
    f"attempts = attempts + 1, started_at = COALESCE(started_at, %s) WHERE id = %s "
    f"RETURNING {_JOB_COLS}"
)
_CANCEL_DEAD = (
    "UPDATE vera_jobs SET status = 'cancelled', finished_at = %s, owner = NULL WHERE id = %s"
)
_HEARTBEAT = (
    "UPDATE vera_jobs SET heartbeat_at = %s, trained_tokens = COALESCE(%s, trained_tokens), "
    "result = COALESCE(%s, result) WHERE id = %s AND status = 'running' AND owner = %s"
)
_FINISH = (
    "UPDATE vera_jobs SET status = %s, finished_at = %s, owner = NULL, "
    "error = COALESCE(%s, error), fine_tuned_model = COALESCE(%s, fine_tuned_model), "
    "trained_tokens = COALESCE(%s, trained_tokens), result = COALESCE(%s, result) "
    f"WHERE id = %s AND {_ACTIVE}"
)
_REQUEUE = (  # a job asked to cancel is not handed to another worker: it ends here
    "UPDATE vera_jobs SET status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END, "
    "finished_at = CASE WHEN cancel_requested THEN %s END, owner = NULL, heartbeat_at = NULL "
    "WHERE id = %s AND status = 'running' AND owner = %s"
)
_NEXT_EVENT = "UPDATE vera_jobs SET event_seq = event_seq + 1 WHERE id = %s RETURNING event_seq"


def _where(*conditions: str, **equal: Any) -> tuple[str, list[Any]]:
    """`` WHERE a = %s AND ... AND conditions`` for the columns ``equal`` gives a value other
    than None, and those values (the parameters of ``conditions`` follow them)."""
    given = {column: value for column, value in equal.items() if value is not None}
    terms = [f"{column} = %s" for column in given] + list(conditions)
    return (f" WHERE {' AND '.join(terms)}" if terms else ""), list(given.values())


def _page(rows: list[Any], limit: int) -> tuple[list[Any], bool]:
    """The first ``limit`` of ``limit + 1`` fetched rows, and whether there were more."""
    return rows[:limit], len(rows) > limit


class JobStore:
    """Files, jobs and events in ``db`` (see the module docstring). Thread-safe."""

    def __init__(self, db: Database) -> None:
        self._db = db
        db.migrate("jobs", STEPS, LEGACY)

    # files

    def put_file(self, user_id: str, filename: str, purpose: str, content: bytes) -> FileRecord:
        """``user_id`` is the file's owner: a user id, or a name the caller reserves for
        owners that are not users (the admin); it is not checked as a user id."""
        if not user_id:
            raise ValueError("a file needs an owner")
        record = FileRecord(new_id("file-"), user_id, filename, purpose, len(content), _now())
        self._db.run(lambda sql: sql.execute(_INSERT_FILE, (*astuple(record), content)), write=True)
        return record

    def get_file(self, file_id: str) -> FileRecord | None:
        query = f"SELECT {_FILE_COLS} FROM vera_files WHERE id = %s"
        row = self._db.run(lambda sql: sql.execute(query, (file_id,)).fetchone())
        return None if row is None else FileRecord(*row)

    def file_content(self, file_id: str) -> bytes | None:
        query = "SELECT data FROM vera_files WHERE id = %s"
        row = self._db.run(lambda sql: sql.execute(query, (file_id,)).fetchone())
        return None if row is None else bytes(row[0])

    def list_files(self, user_id: str | None, purpose: str | None = None) -> list[FileRecord]:
        """Files of ``user_id`` (None: everyone's) with ``purpose`` (None: any), newest first."""
        where, params = _where(user_id=user_id, purpose=purpose)
        query = f"SELECT {_FILE_COLS} FROM vera_files{where} ORDER BY created_at DESC, seq DESC"
        rows = self._db.run(lambda sql: sql.execute(query, params).fetchall())
        return [FileRecord(*row) for row in rows]

    def delete_file(self, file_id: str) -> bool:
        query = "DELETE FROM vera_files WHERE id = %s"
        return self._db.run(lambda sql: sql.execute(query, (file_id,)).rowcount > 0, write=True)

    # jobs

    def create_job(
        self,
        user_id: str,
        model: str,
        training_file: str,
        validation_file: str | None,
        hyperparameters: dict[str, Any],
        suffix: str | None,
        *,
        max_queued: int | None = None,
        max_active_per_user: int | None = None,
    ) -> JobRecord:
        """A new queued job; ``JobLimit`` if the store already has ``max_queued`` queued or
        running jobs, or this user ``max_active_per_user`` (counted and inserted under a lock)."""
        job = JobRecord(
            id=new_id("ftjob-"),
            user_id=user_id,
            model=model,
            training_file=training_file,
            validation_file=validation_file,
            hyperparameters=dict(hyperparameters),
            suffix=suffix,
            status="queued",
            created_at=_now(),
            attempts=0,
            cancel_requested=False,
            **dict.fromkeys(_UNSET_WHEN_QUEUED),
        )

        def insert(sql: Sql) -> None:
            if max_queued is not None or max_active_per_user is not None:
                self._db.lock(sql, "vera_jobs")
            if max_queued is not None and (n := _count(sql, None)) >= max_queued:
                raise JobLimit(f"the fine-tuning queue is full ({n} jobs queued or running)")
            if max_active_per_user is not None and _count(sql, user_id) >= max_active_per_user:
                raise JobLimit(
                    f"user {user_id!r} already has {max_active_per_user} fine-tuning job(s) "
                    "queued or running; wait for one to finish or cancel it"
                )
            sql.execute(_INSERT_JOB, self._job_params(job))

        self._db.run(insert, write=True)
        return job

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._db.run(lambda sql: sql.execute(_GET_JOB, (job_id,)).fetchone())
        return None if row is None else self._job(row)

    def list_jobs(
        self, user_id: str | None, after: str | None = None, limit: int = 20
    ) -> tuple[list[JobRecord], bool]:
        """Up to ``limit`` jobs of ``user_id`` (None: everyone's), newest first, starting after
        the job ``after`` (an unknown id gives none); and whether more follow."""
        older = "(created_at, seq) < (SELECT created_at, seq FROM vera_jobs WHERE id = %s)"
        where, params = _where(*([older] if after else []), user_id=user_id)
        params += [after, limit + 1] if after else [limit + 1]
        query = f"SELECT {_JOB_COLS} FROM vera_jobs{where} ORDER BY created_at DESC, seq DESC"
        rows = self._db.run(lambda sql: sql.execute(query + " LIMIT %s", params).fetchall())
        page, more = _page(rows, limit)
        return [self._job(row) for row in page], more

    def claim(self, owner: str, stale_s: float) -> JobRecord | None:
        """Take the oldest queued job, or running one not heartbeaten for ``stale_s``, for
        ``owner``: status running, heartbeat now, attempts + 1, started_at set once. None if
        there is none."""
        now = time.time()

        next_job = _NEXT + self._db.skip_locked  # claimers of other replicas skip its row

        def take(sql: Sql) -> Any:
            while (row := sql.execute(next_job, (now - stale_s,)).fetchone()) is not None:
                job_id, cancel_requested = row
                if not cancel_requested:
                    return sql.execute(_CLAIM, (owner, now, int(now), job_id)).fetchone()
                sql.execute(_CANCEL_DEAD, (int(now), job_id))  # its worker died: end it
            return None

        row = self._db.run(take, write=True)
        return None if row is None else self._job(row)

    def heartbeat(
        self,
        job_id: str,
        owner: str,
        *,
        trained_tokens: int | None = None,
        result: dict[str, Any] | None = None,
    ) -> bool:
        """Record that ``owner`` still works on the job (and the given fields); False if it no
        longer owns a running job. A requested cancel shows in ``get_job``."""
        params = (time.time(), trained_tokens, self._db.json_param(result), job_id, owner)
        return self._db.run(lambda sql: sql.execute(_HEARTBEAT, params).rowcount == 1, write=True)

    def finish(
        self,
        job_id: str,
        owner: str | None,
        status: str,
        *,
        error: dict[str, Any] | None = None,
        fine_tuned_model: str | None = None,
        trained_tokens: int | None = None,
        result: dict[str, Any] | None = None,
    ) -> JobRecord | None:
        """End a queued or running job with the terminal ``status`` (fields left None keep
        their value). With ``owner``, only if it still owns the job. None if nothing changed."""
        if status not in TERMINAL:
            raise ValueError(f"finish needs a terminal status {sorted(TERMINAL)}, got {status!r}")
        mine = "" if owner is None else " AND owner = %s"
        params = [status, _now(), self._db.json_param(error), fine_tuned_model, trained_tokens]
        params += [self._db.json_param(result), job_id] + ([] if owner is None else [owner])
        query = f"{_FINISH}{mine} RETURNING {_JOB_COLS}"
        row = self._db.run(lambda sql: sql.execute(query, params).fetchone(), write=True)
        return None if row is None else self._job(row)

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a queued job now; ask a running one's worker to stop (``cancel_requested``);
        leave a finished one. The job after that, or None if there is no such job."""

        def cancel(sql: Sql) -> Any:
            sql.execute(
                "UPDATE vera_jobs SET status = 'cancelled', finished_at = %s "
                "WHERE id = %s AND status = 'queued'",
                (_now(), job_id),
            )
            sql.execute(
                "UPDATE vera_jobs SET cancel_requested = %s WHERE id = %s AND status = 'running'",
                (True, job_id),
            )
            return sql.execute(_GET_JOB, (job_id,)).fetchone()

        row = self._db.run(cancel, write=True)
        return None if row is None else self._job(row)

    def requeue(self, job_id: str, owner: str) -> bool:
        """Hand a running job of ``owner`` back to the queue (cancelled instead if a cancel was
        requested). False if ``owner`` does not own a running job."""
        params = (_now(), job_id, owner)
        return self._db.run(lambda sql: sql.execute(_REQUEUE, params).rowcount == 1, write=True)

    # events

    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        type: str = "message",
        data: dict[str, Any] | None = None,
    ) -> JobEvent:
        """Append an event with the job's next ``seq``; StoreError if there is no such job."""
        if level not in _LEVELS or type not in _EVENT_TYPES:
            raise ValueError(f"event level {level!r} or type {type!r} is not allowed")

        def add(sql: Sql) -> JobEvent:
            row = sql.execute(_NEXT_EVENT, (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"no fine-tuning job {job_id!r}")
            event = JobEvent(new_id("ftevent-"), job_id, row[0], _now(), level, message, type, data)
            sql.execute(_INSERT_EVENT, (*astuple(event)[:-1], self._db.json_param(data)))
            return event

        return self._db.run(add, write=True)

    def list_events(
        self, job_id: str, after: str | None = None, limit: int = 20
    ) -> tuple[list[JobEvent], bool]:
        """Up to ``limit`` events of the job, newest first, older than the event ``after`` (an
        unknown id gives none); and whether more follow."""
        condition = " AND seq < (SELECT seq FROM vera_job_events WHERE id = %s)" if after else ""
        query = (
            f"SELECT {_EVENT_COLS} FROM vera_job_events WHERE job_id = %s{condition} "
            "ORDER BY seq DESC LIMIT %s"
        )
        params = (job_id, after, limit + 1) if after else (job_id, limit + 1)
        rows, more = _page(self._db.run(lambda sql: sql.execute(query, params).fetchall()), limit)
        return [self._event(row) for row in rows], more

    # rows

    def _event(self, row: Sequence[Any]) -> JobEvent:
        event_id, job_id, seq, created_at, level, message, kind, data = row
        return JobEvent(
            event_id, job_id, seq, created_at, level, message, kind, self._db.json_value(data)
        )

    def _job_params(self, job: JobRecord) -> list[Any]:
        values = [getattr(job, name) for name in _JOB_FIELDS]
        for name in _JSON_FIELDS:
            index = _JOB_FIELDS.index(name)
            values[index] = self._db.json_param(values[index])
        return values

    def _job(self, row: Sequence[Any]) -> JobRecord:
        values = dict(zip(_JOB_FIELDS, row))
        for name in _JSON_FIELDS:
            values[name] = self._db.json_value(values[name])
        values["cancel_requested"] = bool(values["cancel_requested"])
        return JobRecord(**values)


def _count(sql: Sql, user_id: str | None) -> int:
    """Queued and running jobs of ``user_id`` (None: of everyone)."""
    where, params = _where(_ACTIVE, user_id=user_id)
    query = f"SELECT count(*) FROM vera_jobs{where}"
    return sql.execute(query, params).fetchone()[0]

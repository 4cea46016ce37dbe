"""Usage metering: who used how much, per minute, durable in the store's database.

Every request the engine finishes (completed, stopped, cancelled or failed alike) adds to a
bucket keyed by (minute, user, API key, model): one request, its prompt tokens, the tokens it
generated, and its share of engine time (each step's time split by the tokens each sequence
put through the model). Fine-tuning jobs add the tokens they trained. ``model`` is the base
model's name, or ``<user>@v<version>`` for a user's adapter version.

Counts accumulate in memory and a background thread adds them to ``vera_usage`` every
``flush_s`` seconds in one transaction (``INSERT ... ON CONFLICT DO UPDATE`` adding to the row,
so replicas sharing a database add up). A clean stop flushes what is left: nothing is lost; a
crash loses at most the last ``flush_s`` seconds of counts. A flush that cannot reach the
database keeps its counts for the next one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING, Any

from adapters_store import Database, Sql, StoreUnavailable

if TYPE_CHECKING:
    from server.engine import Sequence

log = logging.getLogger(__name__)

BUCKET_S = 60  # the finest bucket kept
WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
GROUPS = ("user_id", "api_key_id", "model")

_TABLE = """
CREATE TABLE vera_usage (
    bucket_start bigint NOT NULL,
    user_id text NOT NULL,
    api_key_id text NOT NULL,
    model text NOT NULL,
    requests bigint NOT NULL,
    prompt_tokens bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    training_tokens bigint NOT NULL,
    engine_seconds double precision NOT NULL,
    PRIMARY KEY (bucket_start, user_id, api_key_id, model)
);
CREATE INDEX vera_usage_user ON vera_usage (user_id, bucket_start);
"""
STEPS = {"sqlite": (_TABLE,), "postgresql": (_TABLE,)}
_COUNTS = ("requests", "prompt_tokens", "completion_tokens", "training_tokens", "engine_seconds")
_UPSERT = (
    "INSERT INTO vera_usage (bucket_start, user_id, api_key_id, model, "
    + ", ".join(_COUNTS)
    + ") VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (bucket_start, user_id, api_key_id, model) DO UPDATE SET "
    + ", ".join(f"{c} = vera_usage.{c} + excluded.{c}" for c in _COUNTS)
)

Key = tuple[int, str, str, str]  # (bucket start, user, api key id or "", model)


@dataclass
class Counts:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    training_tokens: int = 0
    engine_seconds: float = 0.0

    def add(self, other: Counts) -> None:
        for name in _COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class UsageMeter:
    """Counts requests as the engine finishes them (a ``FinishObserver``) and training as jobs
    report it; flushes to the database (see the module docstring). Thread-safe."""

    def __init__(self, db: Database, base_model: str, flush_s: float = 5.0) -> None:
        self._db, self.base_model, self.flush_s = db, base_model, flush_s
        db.migrate("usage", STEPS)
        self._pending: defaultdict[Key, Counts] = defaultdict(Counts)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- counting (engine thread, job workers) -----------------------------------------------
    def finished(self, seq: Sequence, reason: str) -> None:
        model = self.base_model
        if seq.user_id is not None and seq.adapter_version is not None:
            model = f"{seq.user_id}@v{seq.adapter_version}"
        counts = Counts(1, len(seq.prompt_ids), len(seq.output_ids), 0, seq.engine_seconds)
        self._add((_bucket(time.time()), seq.client, seq.key_id or "", model), counts)

    def trained(self, user_id: str, tokens: int) -> None:
        """A fine-tuning job trained ``tokens`` tokens for ``user_id``."""
        key = (_bucket(time.time()), user_id, "", f"{user_id}@training")
        self._add(key, Counts(training_tokens=tokens))

    def _add(self, key: Key, counts: Counts) -> None:
        with self._lock:
            self._pending[key].add(counts)

    # -- flushing ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="vera-usage", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and flush what is left (a clean stop loses nothing)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()

    def flush(self) -> int:
        """Add the pending counts to the database; returns the rows written (0 if it could not
        reach it: they stay pending)."""
        with self._lock:
            pending, self._pending = self._pending, defaultdict(Counts)
        if not pending:
            return 0

        def transaction(sql: Sql) -> None:
            for key, counts in sorted(pending.items()):
                sql.execute(_UPSERT, (*key, *astuple(counts)))

        try:
            self._db.run(transaction, write=True)
        except StoreUnavailable:
            log.warning("usage: the store is unreachable; %d buckets kept", len(pending))
            with self._lock:
                for key, counts in pending.items():
                    self._pending[key].add(counts)
            return 0
        return len(pending)

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception:  # the meter must outlive a bad moment of the store
                log.exception("usage: flush failed")

    # -- reading ----------------------------------------------------------------------------
    def query(
        self,
        start: int,
        end: int,
        width: str = "1d",
        group_by: tuple[str, ...] = (),
        user_ids: tuple[str, ...] = (),
    ) -> list[dict[str, Any]]:
        """Buckets of ``width`` from ``start`` to ``end`` (unix seconds), each with one result
        per group (``group_by`` among user_id, api_key_id, model; none: one total), for the
        users in ``user_ids`` (empty: everyone). What is still pending is included."""
        size = WIDTHS[width]
        self.flush()
        where = "bucket_start >= %s AND bucket_start < %s"
        params: list[Any] = [start - start % BUCKET_S, end]
        if user_ids:
            where += f" AND user_id IN ({', '.join(['%s'] * len(user_ids))})"
            params += list(user_ids)
        columns = ", ".join(("bucket_start", *GROUPS, *_COUNTS))
        query = f"SELECT {columns} FROM vera_usage WHERE {where}"
        rows = self._db.run(lambda sql: sql.execute(query, params).fetchall())
        totals: dict[int, dict[tuple[str, ...], Counts]] = {}
        first = start - start % size
        for b in range(first, end, size):
            totals[b] = {}
        for row in rows:
            bucket = int(row[0]) - int(row[0]) % size
            if bucket not in totals:
                continue
            group = tuple(row[1 + GROUPS.index(g)] for g in group_by)
            totals[bucket].setdefault(group, Counts()).add(Counts(*row[4:]))
        return [_bucket_object(b, b + size, group_by, results) for b, results in totals.items()]


def _bucket(now: float) -> int:
    return int(now) - int(now) % BUCKET_S


def _bucket_object(
    start: int, end: int, group_by: tuple[str, ...], results: dict[tuple[str, ...], Counts]
) -> dict[str, Any]:
    """One bucket as OpenAI's usage API shapes it (``organization.usage.completions``)."""
    out = []
    for group, c in sorted(results.items()):
        item: dict[str, Any] = {
            "object": "organization.usage.completions.result",
            "input_tokens": c.prompt_tokens,
            "output_tokens": c.completion_tokens,
            "input_cached_tokens": 0,
            "num_model_requests": c.requests,
            "training_tokens": c.training_tokens,
            "engine_seconds": round(c.engine_seconds, 4),
        }
        for name in GROUPS:
            value = group[group_by.index(name)] if name in group_by else None
            item[name] = value or None  # "" (no API key) reads as null
        out.append(item)
    return {"object": "bucket", "start_time": start, "end_time": end, "results": out}

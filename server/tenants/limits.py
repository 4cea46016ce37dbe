"""Each user's limits and tier: defaults from the flags, per-user overrides in the store.

A user's effective limits are its override where it has one, the server's default elsewhere:
``weight`` (its share under fair scheduling: 2 = served twice as much as weight 1), requests
and tokens per minute, requests in flight at once, and requests it may have queued. ``0`` means
unlimited. Overrides live in the store's database (table ``vera_tenant_limits``), so every
replica sharing it applies the same limits.

Reads never touch the database on the hot path: the registry holds every override in memory;
a change made here is visible here at once. Where other replicas may change them (a shared
database), a background thread rereads them every few seconds (``refresh``), so they apply on
every replica within that. The engine thread reads ``weight`` and ``max_waiting`` from that
copy only.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, fields, replace

from adapters_store import Database, Sql, StoreUnavailable

log = logging.getLogger(__name__)

_TABLE = """
CREATE TABLE vera_tenant_limits (
    user_id text PRIMARY KEY,
    weight double precision,
    requests_per_minute bigint,
    tokens_per_minute bigint,
    max_concurrent bigint,
    max_queued bigint,
    updated_at double precision NOT NULL
);
"""
STEPS = {"sqlite": (_TABLE,), "postgresql": (_TABLE,)}
_COLUMNS = "weight, requests_per_minute, tokens_per_minute, max_concurrent, max_queued"


@dataclass(frozen=True)
class Limits:
    """A user's limits. In an override, None means "the server's default"; in effective limits
    every field is set, 0 meaning unlimited (``weight`` is always > 0)."""

    weight: float | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt + max_new_tokens of each request
    max_concurrent: int | None = None  # requests in flight at once
    max_queued: int | None = None  # requests waiting in the engine's queue at once

    def __post_init__(self) -> None:
        if self.weight is not None and not 0 < self.weight <= 1000:
            raise ValueError("weight must be in (0, 1000]")
        for f in fields(self)[1:]:
            value = getattr(self, f.name)
            if value is not None and value < 0:
                raise ValueError(f"{f.name} must be >= 0 (0 = unlimited)")

    def over(self, default: Limits) -> Limits:
        """These overrides on top of ``default`` (every field of which is set)."""
        given = {k: v for k, v in asdict(self).items() if v is not None}
        return replace(default, **given)

    @property
    def empty(self) -> bool:
        return all(v is None for v in asdict(self).values())


class LimitRegistry:
    """Every user's limits (see the module docstring). Thread-safe."""

    def __init__(self, db: Database, default: Limits, ttl_s: float = 5.0) -> None:
        if any(v is None for v in asdict(default).values()):
            raise ValueError("the default limits must set every field")
        self.default, self.ttl_s = default, ttl_s
        self._db = db
        db.migrate("tenant_limits", STEPS)
        self._overrides: dict[str, Limits] = {}
        self._loaded_at = float("-inf")
        self._lock = threading.Lock()
        self.refresh(force=True)

    # -- what the engine and the rate limiter ask (memory only) ----------------------------
    def effective(self, user_id: str) -> Limits:
        override = self._overrides.get(user_id)
        return self.default if override is None else override.over(self.default)

    def weight(self, client: str) -> float:
        weight = self.effective(client).weight
        assert weight is not None
        return weight

    def max_waiting(self, client: str) -> int:
        queued = self.effective(client).max_queued
        return queued if queued else 1 << 30  # 0: no share of its own, the queue bound only

    # -- the admin's view and changes -------------------------------------------------------
    def overrides(self) -> dict[str, Limits]:
        self.refresh()
        return dict(self._overrides)

    def override(self, user_id: str) -> Limits:
        self.refresh()
        return self._overrides.get(user_id, Limits())

    def set(self, user_id: str, limits: Limits) -> Limits:
        """Replace ``user_id``'s overrides (all None: back to the defaults); returns them."""
        values = tuple(getattr(limits, f.name) for f in fields(limits))

        def write(sql: Sql) -> None:
            if limits.empty:
                sql.execute("DELETE FROM vera_tenant_limits WHERE user_id = %s", (user_id,))
                return
            sql.execute(
                f"INSERT INTO vera_tenant_limits (user_id, {_COLUMNS}, updated_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (user_id) DO UPDATE SET "
                + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS.split(", "))
                + ", updated_at = excluded.updated_at",
                (user_id, *values, time.time()),
            )

        self._db.run(write, write=True)
        with self._lock:
            if limits.empty:
                self._overrides.pop(user_id, None)
            else:
                self._overrides[user_id] = limits
        return limits

    def refresh(self, force: bool = False) -> None:
        """Reload every override if the copy is older than ``ttl_s`` (or ``force``). While the
        database is unreachable the copy is kept (and ``force`` raises)."""
        if not force and time.monotonic() - self._loaded_at < self.ttl_s:
            return
        query = f"SELECT user_id, {_COLUMNS} FROM vera_tenant_limits"
        try:
            rows = self._db.run(lambda sql: sql.execute(query).fetchall())
        except StoreUnavailable:
            if force:
                raise
            log.warning("tenant limits: the store is unreachable; keeping the last copy")
            self._loaded_at = time.monotonic()
            return
        loaded = {row[0]: Limits(*row[1:]) for row in rows}
        with self._lock:
            self._overrides = loaded
            self._loaded_at = time.monotonic()

"""Per-user rate limits: requests and tokens per minute, requests in flight at once.

A request is admitted by ``RateLimiter.admit`` before it reaches the engine and holds a
``Permit`` until its response ends. Each limit is a sliding window of the last 60 seconds
(never more than the limit in any 60 seconds, whatever the clock's minute): a request counts
one request and its prompt plus ``max_new_tokens`` tokens (what it may use, known at admission,
as OpenAI counts ``max_tokens``). A refused request gets ``RateLimited`` (HTTP 429) naming the
limit, with ``Retry-After``; every answer of a limited user carries OpenAI's headers
(``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``; ``reset``: until the oldest request
counted leaves the window). Users without limits cost nothing here.

Where the counts live (``Ledger``): in this process when the store is a directory (one server:
exact); in the store's PostgreSQL database when replicas share it (``DbLedger``): every
admission is one transaction under the user's writer lock, so the limits hold exactly across
replicas, not once per replica. In-flight counts are rows per replica with a heartbeat; a
replica that died stops counting after ``STALE_S``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Protocol

from adapters_store import Database, Sql, StoreUnavailable
from server.tenants.limits import LimitRegistry, Limits

log = logging.getLogger(__name__)

WINDOW_S = 60.0
STALE_S = 30.0  # a replica whose in-flight rows were not refreshed this long is gone


class RateLimited(Exception):
    """A request over one of its user's limits (HTTP 429, with these headers)."""

    def __init__(self, message: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.headers = headers


@dataclass(frozen=True)
class Window:
    """A user's counted use: requests and tokens in the last minute, the oldest one's time,
    requests in flight (every replica)."""

    requests: int
    tokens: int
    oldest: float | None
    in_flight: int


class Ledger(Protocol):
    def take(self, client: str, tokens: int, limits: Limits, now: float) -> Window:
        """The user's use before this request; the request is counted (and held in flight)
        only if ``decide`` allows it, atomically with that reading."""
        ...

    def release(self, client: str) -> None:
        """A request of ``client`` counted in flight has ended."""
        ...


@dataclass
class Permit:
    """An admitted request's hold on its user's limits; ``release`` once its response ends."""

    headers: dict[str, str] = field(default_factory=dict)
    _release: threading.Event | None = None
    _ledger: Ledger | None = None
    _client: str = ""

    def release(self) -> None:
        """Idempotent; a store that cannot be reached is healed by the ledger's heartbeat."""
        if self._ledger is None or self._release is None or self._release.is_set():
            return
        self._release.set()
        try:
            self._ledger.release(self._client)
        except StoreUnavailable:
            log.warning("rate limits: the store is unreachable; in-flight count fixed later")


def decide(use: Window, tokens: int, limits: Limits, now: float) -> str | None:
    """Why the request is refused, or None if every limit allows it."""
    rpm, tpm, concurrent = (
        limits.requests_per_minute,
        limits.tokens_per_minute,
        limits.max_concurrent,
    )
    if tpm and tokens > tpm:
        return (
            f"the request needs {tokens} tokens (prompt + max tokens), more than the "
            f"{tpm} tokens per minute allowed; ask for fewer"
        )
    if rpm and use.requests >= rpm:
        return f"rate limit reached: {rpm} requests per minute"
    if tpm and use.tokens + tokens > tpm:
        return f"rate limit reached: {tpm} tokens per minute ({use.tokens} used)"
    if concurrent and use.in_flight >= concurrent:
        return f"rate limit reached: {concurrent} requests in flight at once"
    return None


def headers(use: Window, tokens: int, limits: Limits, now: float, admitted: bool) -> dict[str, str]:
    """OpenAI's rate-limit headers for a user's limits, after this request (if admitted)."""
    out: dict[str, str] = {}
    reset = _duration(max(0.0, use.oldest + WINDOW_S - now) if use.oldest is not None else 0.0)
    if limits.requests_per_minute:
        left = limits.requests_per_minute - use.requests - (1 if admitted else 0)
        out["x-ratelimit-limit-requests"] = str(limits.requests_per_minute)
        out["x-ratelimit-remaining-requests"] = str(max(0, left))
        out["x-ratelimit-reset-requests"] = reset
    if limits.tokens_per_minute:
        left = limits.tokens_per_minute - use.tokens - (tokens if admitted else 0)
        out["x-ratelimit-limit-tokens"] = str(limits.tokens_per_minute)
        out["x-ratelimit-remaining-tokens"] = str(max(0, left))
        out["x-ratelimit-reset-tokens"] = reset
    return out


def _duration(seconds: float) -> str:
    """OpenAI's style: ``"250ms"``, ``"12.5s"``, ``"1m0s"``."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 1):g}s"
    return f"{int(seconds // 60)}m{int(seconds % 60)}s"


class RateLimiter:
    def __init__(self, registry: LimitRegistry, ledger: Ledger) -> None:
        self.registry, self.ledger = registry, ledger
        self.refused = 0  # requests answered 429 by a rate limit

    def admit(self, client: str, tokens: int) -> Permit:
        """Count a request of ``tokens`` (prompt + max_new_tokens) against ``client``'s limits,
        or raise RateLimited. Blocking (the shared ledger is a database call)."""
        self.registry.refresh()
        limits = self.registry.effective(client)
        if not (limits.requests_per_minute or limits.tokens_per_minute or limits.max_concurrent):
            return Permit()
        now = time.time()
        use = self.ledger.take(client, tokens, limits, now)
        refused = decide(use, tokens, limits, now)
        out = headers(use, tokens, limits, now, admitted=refused is None)
        if refused is not None:
            wait = (use.oldest + WINDOW_S - now) if use.oldest is not None else 1.0
            if limits.max_concurrent and use.in_flight >= limits.max_concurrent:
                wait = 1.0
            out["Retry-After"] = str(max(1, math.ceil(wait)))
            self.refused += 1
            raise RateLimited(f"{refused} for user {client!r}", out)
        return Permit(out, threading.Event(), self.ledger, client)


class LocalLedger:
    """Counts in this process: a directory store has one server. Exact. Thread-safe."""

    def __init__(self) -> None:
        self._events: dict[str, deque[tuple[float, int]]] = {}
        self._in_flight: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, client: str, tokens: int, limits: Limits, now: float) -> Window:
        with self._lock:
            events = self._events.setdefault(client, deque())
            while events and events[0][0] <= now - WINDOW_S:
                events.popleft()
            use = Window(
                len(events),
                sum(t for _, t in events),
                events[0][0] if events else None,
                self._in_flight[client],
            )
            if decide(use, tokens, limits, now) is None:
                events.append((now, tokens))
                self._in_flight[client] += 1
            elif not events:
                del self._events[client]
            return use

    def release(self, client: str) -> None:
        with self._lock:
            self._in_flight[client] -= 1
            if self._in_flight[client] <= 0:
                del self._in_flight[client]


_EVENTS = """
CREATE TABLE vera_rate_events (
    user_id text NOT NULL,
    at double precision NOT NULL,
    tokens bigint NOT NULL
);
CREATE INDEX vera_rate_events_user ON vera_rate_events (user_id, at);
CREATE TABLE vera_rate_in_flight (
    user_id text NOT NULL,
    replica text NOT NULL,
    n bigint NOT NULL,
    heartbeat_at double precision NOT NULL,
    PRIMARY KEY (user_id, replica)
);
"""
STEPS = {"sqlite": (_EVENTS,), "postgresql": (_EVENTS,)}


class DbLedger:
    """Counts in the store's database, shared by every replica (see the module docstring)."""

    def __init__(self, db: Database, replica: str) -> None:
        self._db, self.replica = db, replica
        self._mine: Counter[str] = Counter()  # this replica's requests in flight, per user
        self._lock = threading.Lock()
        db.migrate("rate_limits", STEPS)

    def take(self, client: str, tokens: int, limits: Limits, now: float) -> Window:
        def transaction(sql: Sql) -> Window:
            self._db.lock(sql, f"rate:{client}")
            sql.execute(
                "DELETE FROM vera_rate_events WHERE user_id = %s AND at <= %s",
                (client, now - WINDOW_S),
            )
            row = sql.execute(
                "SELECT count(*), coalesce(sum(tokens), 0), min(at) FROM vera_rate_events "
                "WHERE user_id = %s",
                (client,),
            ).fetchone()
            flying = sql.execute(
                "SELECT coalesce(sum(n), 0) FROM vera_rate_in_flight "
                "WHERE user_id = %s AND heartbeat_at > %s",
                (client, now - STALE_S),
            ).fetchone()
            use = Window(int(row[0]), int(row[1]), row[2], int(flying[0]))
            if decide(use, tokens, limits, now) is None:
                sql.execute(
                    "INSERT INTO vera_rate_events (user_id, at, tokens) VALUES (%s, %s, %s)",
                    (client, now, tokens),
                )
                sql.execute(
                    "INSERT INTO vera_rate_in_flight (user_id, replica, n, heartbeat_at) "
                    "VALUES (%s, %s, 1, %s) ON CONFLICT (user_id, replica) DO UPDATE SET "
                    "n = vera_rate_in_flight.n + 1, heartbeat_at = excluded.heartbeat_at",
                    (client, self.replica, now),
                )
            return use

        use = self._db.run(transaction, write=True, durable=False)
        if decide(use, tokens, limits, now) is None:
            with self._lock:
                self._mine[client] += 1
        return use

    def release(self, client: str) -> None:
        with self._lock:
            self._mine[client] -= 1
            if self._mine[client] <= 0:
                del self._mine[client]
        self._db.run(
            lambda sql: sql.execute(
                "UPDATE vera_rate_in_flight SET n = n - 1, heartbeat_at = %s "
                "WHERE user_id = %s AND replica = %s AND n > 0",
                (time.time(), client, self.replica),
            ),
            write=True,
            durable=False,
        )

    def heartbeat(self) -> None:
        """Rewrite this replica's in-flight rows from its own counts (healing a release that
        could not reach the store) and drop the rows of replicas gone."""
        now = time.time()
        with self._lock:
            mine = dict(self._mine)

        def transaction(sql: Sql) -> None:
            sql.execute("DELETE FROM vera_rate_in_flight WHERE replica = %s", (self.replica,))
            for client, n in mine.items():
                sql.execute(
                    "INSERT INTO vera_rate_in_flight (user_id, replica, n, heartbeat_at) "
                    "VALUES (%s, %s, %s, %s)",
                    (client, self.replica, n, now),
                )
            sql.execute(
                "DELETE FROM vera_rate_in_flight WHERE heartbeat_at <= %s", (now - 4 * STALE_S,)
            )

        self._db.run(transaction, write=True, durable=False)

"""The server's vital signs over the last half hour, for charts that have data the moment they open.

``StatsHistory`` samples every ``interval_s`` (2 s) into a ring of at most
``window_s / interval_s`` rows (30 min: 900 rows of a few numbers each). ``GET /admin/history``
answers them as columns, oldest first; ``?since=<t>`` gives only the rows after ``t``, so a
page that polls receives each row once.

Guarantees:

* A sample reads exactly what ``GET /admin/stats`` reads (``collect_stats``): counters and
  gauges the engine keeps for any thread to read. Nothing is submitted to the engine thread and
  nothing waits on it; the sampler runs on a thread of its own.
* A store outage never stops sampling: the adapter store's tiers are then null (the store's
  own ``reachable`` rule), and a sample that fails outright is skipped and logged once.
* A value missing from the stats (a CPU server has no device memory) is null in its column,
  so every column always has one entry per timestamp.
* ``start`` and ``stop`` are idempotent; ``stop`` returns once the sampling thread has ended.
* Every answer names its ``source`` (host and process): a cluster's replicas each keep their own
  history, and a restarted server starts a new one, so a reader merging answers can tell.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from server.api.auth import Principal, principal, require_admin
from server.api.schemas import error_responses
from server.periodic import Periodic

log = logging.getLogger("vera-serve")
router = APIRouter()

INTERVAL_S = 2.0
WINDOW_S = 30 * 60.0

# column -> where it is in ``collect_stats``'s answer (dotted path)
COLUMNS: dict[str, str] = {
    "device_adapters": "adapters.device.adapters",
    "device_bytes": "adapters.device.bytes",
    "host_adapters": "adapters.host.adapters",
    "host_bytes": "adapters.host.bytes",
    "disk_adapters": "adapters.disk.adapters",
    "disk_bytes": "adapters.disk.bytes",
    "kv_cache_bytes": "engine.kv_cache_bytes",
    "host_rss_bytes": "memory.host_rss_bytes",
    "device_allocated_bytes": "memory.device_allocated_bytes",
    "tokens_per_s": "engine.tokens_per_s",
    "ttft_p50_ms": "engine.ttft_ms.p50",
    "ttft_p99_ms": "engine.ttft_ms.p99",
    "queue_depth": "engine.queue_depth",
    "running_batch": "engine.running_batch",
    "preemptions": "engine.preemptions",
    "requests": "engine.requests_submitted",
    "completion_tokens": "engine.completion_tokens",
}

Number = float | int | None
Row = tuple[Number, ...]  # (t, then COLUMNS in order)


def pick(stats: dict[str, Any], path: str) -> Number:
    """The number at ``path`` ("a.b.c") in ``stats``; None where absent or not a number."""
    value: Any = stats
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


class StatsHistory:
    """A bounded ring of samples of ``read()`` (a ``collect_stats`` of the runtime), taken on a
    daemon thread every ``interval_s`` while started."""

    def __init__(
        self,
        read: Callable[[], dict[str, Any]],
        interval_s: float = INTERVAL_S,
        window_s: float = WINDOW_S,
    ) -> None:
        if interval_s <= 0 or window_s < interval_s:
            raise ValueError("need 0 < interval_s <= window_s")
        self.read, self.interval_s, self.window_s = read, interval_s, window_s
        self.source = f"{socket.gethostname()}:{os.getpid()}"
        self._rows: deque[Row] = deque(maxlen=int(window_s / interval_s))
        self._lock = threading.Lock()
        self._ticks = Periodic("vera-stats-history", interval_s, self.sample, at_start=True)
        self._failing = False  # log a failure once, not every interval

    def start(self) -> None:
        self._ticks.start()

    def stop(self) -> None:
        self._ticks.stop()

    def sample(self) -> bool:
        """Take one sample now; False if reading the stats failed (nothing recorded)."""
        try:
            stats = self.read()
        except Exception:
            if not self._failing:
                log.warning("stats history: a sample failed; retrying", exc_info=True)
            self._failing = True
            return False
        self._failing = False
        row = (round(time.time(), 3), *(pick(stats, path) for path in COLUMNS.values()))
        with self._lock:
            self._rows.append(row)
        return True

    def columns(self, since: float | None = None) -> dict[str, Any]:
        """``{"source", "interval_s", "window_s", "columns": {"t": [...], <name>: [...]}}``,
        oldest first, only rows with ``t > since`` when given."""
        with self._lock:
            rows = [r for r in self._rows if since is None or (r[0] or 0) > since]
        names = ("t", *COLUMNS)
        return {
            "source": self.source,
            "interval_s": self.interval_s,
            "window_s": self.window_s,
            "columns": {name: [r[i] for r in rows] for i, name in enumerate(names)},
        }


@router.get("/admin/history", responses=error_responses(401, 403, 422))
async def history(
    request: Request,
    since: Annotated[float | None, Query(ge=0, description="unix seconds: rows after it")] = None,
    who: Principal = Depends(principal),
) -> dict[str, Any]:
    """The last half hour sampled every 2 s: adapter tiers (count and bytes on device, in host
    memory, in the store), KV cache and process memory, tokens/s, TTFT p50/p99, queue, running
    batch, preemptions; as columns keyed by name, ``t`` in unix seconds."""
    require_admin(who)
    stats_history: StatsHistory = request.app.state.history
    return stats_history.columns(since)

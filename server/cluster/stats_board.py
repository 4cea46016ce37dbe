"""The cluster's view of its replicas: each engine replica pushes a ``ReplicaReport`` every
``STATS_INTERVAL_S``; the gateway reads the fresh ones for ``/health``, ``/admin/stats`` and
``/metrics``.

A small Ray Serve deployment (one replica, no CPU) rather than a detached actor, so it lives
and dies with the application. Guarantees: a report older than ``STATS_STALE_S`` is not
returned (a replica that died stops counting within that time); a replica that shuts down
cleanly removes its report at once; if the board itself restarts it is refilled within one
interval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from ray import serve

from server.cluster.config import STATS_STALE_S


@dataclass(frozen=True)
class ReplicaReport:
    replica: str  # Ray Serve replica id
    pid: int
    node: str  # node IP
    healthy: bool  # the engine thread is alive
    stats: dict[str, Any]  # server.api.admin.collect_stats of that replica
    metrics: str  # its Prometheus text exposition
    age_s: float = 0.0  # seconds since the board received it (the board's clock only)


@serve.deployment(
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
    logging_config={"enable_access_log": False},  # a report per replica per second
)
class StatsBoard:
    def __init__(self) -> None:
        self._reports: dict[str, tuple[ReplicaReport, float]] = {}  # replica -> (report, t)

    def report(self, report: ReplicaReport) -> None:
        self._reports[report.replica] = (report, time.monotonic())

    def forget(self, replica: str) -> None:
        self._reports.pop(replica, None)

    def snapshot(self) -> list[ReplicaReport]:
        """Fresh reports, sorted by replica id."""
        now, fresh = time.monotonic(), []
        for replica, (report, received) in list(self._reports.items()):
            if now - received > STATS_STALE_S:
                del self._reports[replica]
            else:
                fresh.append(replace(report, age_s=round(now - received, 3)))
        return sorted(fresh, key=lambda r: r.replica)

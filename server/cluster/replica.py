"""One engine replica: the whole single-server process (``Runtime`` + its FastAPI app) inside a
Ray Serve deployment, answering requests the gateway forwards.

Guarantees:

* ``forward`` answers exactly as ``vera-serve serve`` would (``forwarding.replay`` into the
  same ``create_app(runtime)``), including mixed-user batching: every request of every user
  lands in the one engine loop of this process.
* ``check_health`` raises once the engine thread is dead, so Ray replaces the replica.
* On scale-down or shutdown Ray first waits (up to ``DRAIN_S``) for the requests in flight,
  then ``__del__`` drains the engine and closes the store (``Runtime.shutdown``).
* Every ``STATS_INTERVAL_S`` it pushes a ``ReplicaReport`` (stats, metrics, pid) to the board.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

import ray
import torch
from prometheus_client import generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle

from server.api.admin import collect_stats
from server.api.app import create_app
from server.cluster.config import STATS_INTERVAL_S
from server.cluster.forwarding import HttpRequest, ResponseHead, replay
from server.cluster.stats_board import ReplicaReport
from server.config import ServerConfig
from server.runtime import Runtime

log = logging.getLogger("vera-serve")

# Routing keys a replica advertises as warm (LRU), as many as the default device slots.
WARM_KEYS = 256


def engine_alive(runtime: Runtime) -> bool:
    return runtime.engine.alive


@serve.deployment
class EngineReplica:
    def __init__(self, config: ServerConfig, board: DeploymentHandle, threads: int) -> None:
        logging.basicConfig(level=config.log_level.upper())
        torch.set_num_threads(threads)
        self.runtime = Runtime.build(config)
        self.app = create_app(self.runtime)
        self.runtime.start()
        self.app.state.history.start()  # the app's lifespan does not run here
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.board = board
        # Ray Serve runs the constructor on the replica's event loop, where handle calls
        # belong (in its throughput-optimized mode, on no other thread).
        self._pusher = asyncio.get_running_loop().create_task(self._push_reports())

    async def forward(self, request: HttpRequest) -> AsyncIterator[ResponseHead | bytes]:
        """Replay ``request`` into this replica's app; stream its head, then body chunks."""
        key = serve.get_multiplexed_model_id()
        if key:
            await self.mark_warm(key)
        async for item in replay(self.app, request):
            yield item

    @serve.multiplexed(max_num_models_per_replica=WARM_KEYS)
    async def mark_warm(self, key: str) -> str:
        """Advertise ``key`` to the router (``routing.UserAffinityRouter``); nothing to load:
        adapters reach a slot through the runtime's SlotPool on the request itself."""
        return key

    def check_health(self) -> None:
        if not engine_alive(self.runtime):
            raise RuntimeError("the engine thread is not running")

    def report(self) -> ReplicaReport:
        return ReplicaReport(
            replica=self.replica_id,
            pid=os.getpid(),
            node=ray.util.get_node_ip_address(),
            healthy=engine_alive(self.runtime),
            stats=collect_stats(self.runtime),
            metrics=generate_latest(self.app.state.metrics_registry).decode(),
        )

    async def _push_reports(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            try:
                report = await asyncio.to_thread(self.report)  # the store is I/O
                await self.board.report.remote(report)
            except Exception:  # the board restarting, or the stats failing: try next round
                log.warning("stats report failed", exc_info=True)

    def __del__(self) -> None:
        pusher = getattr(self, "_pusher", None)
        if pusher is None or pusher.done():
            return  # the constructor failed (nothing started), or already shut down
        pusher.cancel()
        self.board.forget.remote(self.replica_id)  # best effort: reports also go stale
        self.app.state.history.stop()
        self.runtime.shutdown()

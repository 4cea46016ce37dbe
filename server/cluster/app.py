"""The Ray Serve application: a stats board, N engine replicas, and the gateway in front.

``build_application`` is what ``vera-serve cluster`` deploys; ``app_builder`` is the same for
Ray Serve's config files (KubeRay's ``serveConfigV2``, ``serve run``): it reads the settings
from ``VERA_*`` env vars plus the config's ``args``, and requires what a shared deployment
needs: an admin token and a shared (database) store.
"""

from __future__ import annotations

import argparse
from typing import Any, cast

from ray.serve import Application, Deployment
from ray.serve.config import RequestRouterConfig

from server import config as server_config
from server.cluster import config as cluster_config
from server.cluster.config import DRAIN_S, HEALTH_PERIOD_S, ClusterConfig, require_shared_store
from server.cluster.gateway import Gateway
from server.cluster.replica import EngineReplica
from server.cluster.routing import UserAffinityRouter
from server.cluster.stats_board import StatsBoard
from server.config import ServerConfig

APP_NAME = "vera"


def build_application(server: ServerConfig, cluster: ClusterConfig) -> Application:
    # @serve.deployment turned each class into a Deployment (its stubs keep the class type)
    board = cast(Deployment, StatsBoard).bind()
    per_replica = server.max_batch + server.max_waiting  # the engine bounds its own queue
    engines = (
        cast(Deployment, EngineReplica)
        .options(
            num_replicas=cluster.replicas,
            max_ongoing_requests=per_replica,
            ray_actor_options={"num_cpus": cluster.replica_cpus, "num_gpus": cluster.replica_gpus},
            graceful_shutdown_timeout_s=DRAIN_S,
            health_check_period_s=HEALTH_PERIOD_S,
            request_router_config=RequestRouterConfig(
                request_router_class=cast(Any, UserAffinityRouter),  # a class or an import path
                request_router_kwargs={"slack": cluster.affinity_slack},
            ),
        )
        .bind(server, board, cluster.replica_threads)
    )
    return (
        cast(Deployment, Gateway)
        .options(
            max_ongoing_requests=cluster.replicas * per_replica, graceful_shutdown_timeout_s=DRAIN_S
        )
        .bind(engines, board, server.max_body_bytes)
    )


def app_builder(args: dict[str, Any]) -> Application:
    """Ray Serve application builder: ``import_path: server.cluster.app:app_builder``.

    ``args`` are flags without dashes (``{"replicas": 4, "max_batch": 128}``); anything not
    given comes from ``VERA_*`` env vars, then the defaults.
    """
    parser = argparse.ArgumentParser(prog="server.cluster.app:app_builder")
    server_config.add_arguments(parser)
    cluster_config.add_arguments(parser)
    parsed = parser.parse_args(_flags(args))
    server, cluster = server_config.from_args(parsed), cluster_config.from_args(parsed)
    if server.dev_mode:
        raise ValueError("a served cluster needs VERA_ADMIN_TOKEN (dev mode has no auth)")
    require_shared_store(server)
    return build_application(server, cluster)


def _flags(args: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, str(value)]
    return out

"""``vera-serve cluster``: start (or join) Ray, deploy the application, serve until a signal.

Without ``--ray-address`` a Ray instance is started on this machine and torn down on exit; with
one, the application is deployed onto that cluster and deleted from it on exit (the cluster and
any other Serve applications on it stay up). SIGTERM or SIGINT drains first: Ray waits for the
requests in flight (up to ``DRAIN_S``) before each replica shuts its engine down.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import ray
from ray import serve

from server.cluster.app import APP_NAME, build_application
from server.cluster.config import ClusterConfig
from server.config import ServerConfig

log = logging.getLogger("vera-serve")


def run(server: ServerConfig, cluster: ClusterConfig) -> int:
    cluster.check_store(server)
    if cluster.local:
        cpus = os.cpu_count() or 1
        if cluster.replicas * cluster.replica_cpus > cpus:
            raise ValueError(
                f"{cluster.replicas} replicas x {cluster.replica_cpus} CPUs do not fit this "
                f"machine's {cpus} CPUs: lower --replica-cpus (0 = no reservation)"
            )
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=cluster.ray_address, logging_level=logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": server.host, "port": server.port})
        serve.run(build_application(server, cluster), name=APP_NAME, route_prefix="/")
        log.info(
            "vera-serve cluster: %d replicas of %s on http://%s:%d",
            cluster.replicas,
            server.model,
            server.host,
            server.port,
        )
        while not stop.wait(1.0):
            pass
        log.info("draining and shutting down")
    finally:
        serve.delete(APP_NAME)  # blocks while replicas drain (serve.shutdown gives up at 30 s)
        log.info("application deleted")
        if cluster.local:
            serve.shutdown()
            ray.shutdown()
    return 0

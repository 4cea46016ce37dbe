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

# Ray Serve's throughput-optimized mode (gRPC between its proxy and the replicas, user code and
# handle routing on each replica's main event loop; the gateway also listens on a port of
# 30000-31000 on --host, for an HAProxy in front): in two interleaved bench_cluster runs on a
# shared 2-core machine `cluster` reached 0.92x and 0.76x of `vera-serve serve` with it, 0.77x
# and 0.65x without. Logs stay on stderr (that mode would hide the replicas' startup lines),
# and the gateway does not linger 30 s after a drain for a load balancer to deregister it
# (there is none in front of a local Ray). Ray reads these when its modules load, here and in
# every process of the Ray it starts, so they are set before `import ray`; the environment
# wins. A cluster joined with --ray-address keeps its own settings (set them on its nodes).
RAY_DEFAULTS = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_LOG_TO_STDERR": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
}
for _name, _value in RAY_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

import ray  # noqa: E402
from ray import serve  # noqa: E402

from server.cluster.app import APP_NAME, build_application  # noqa: E402
from server.cluster.config import ClusterConfig  # noqa: E402
from server.config import ServerConfig  # noqa: E402

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

"""Cluster-only settings: one frozen dataclass beside ``ServerConfig`` (which configures each
replica's engine and model exactly as ``vera-serve serve`` does).

Every field is a ``--flag`` defaulting to its ``VERA_<NAME>`` env var, then the field default.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Any

from server.config import ServerConfig

# Seconds a replica keeps draining in-flight requests on scale-down or shutdown (as `serve`).
DRAIN_S = 120.0
# Seconds between a replica's stats pushes, and the age past which a report counts as dead.
STATS_INTERVAL_S = 1.0
STATS_STALE_S = 5.0
# Seconds between Ray's calls to a replica's check_health.
HEALTH_PERIOD_S = 5.0


@dataclass(frozen=True)
class ClusterConfig:
    replicas: int = field(default=2, metadata={"help": "engine replicas (each loads the model)"})
    ray_address: str = field(
        default="",
        metadata={"help": "Ray cluster to join (ray://... or HOST:PORT); empty = a local Ray"},
    )
    replica_cpus: float = field(
        default=1.0,
        metadata={"help": "Ray CPUs reserved per replica (also its torch threads, floor >= 1)"},
    )
    replica_gpus: float = field(
        default=0.0, metadata={"help": "Ray GPUs per replica (1 for --device cuda)"}
    )
    affinity_slack: int = field(
        default=4,
        metadata={
            "help": "requests a replica warm for the user may have beyond the least loaded "
            "of two random replicas before the request goes to the latter"
        },
    )

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("--replicas must be >= 1")
        if self.replica_cpus < 0 or self.replica_gpus < 0 or self.affinity_slack < 0:
            raise ValueError("--replica-cpus, --replica-gpus and --affinity-slack must be >= 0")

    @property
    def local(self) -> bool:
        """True when the cluster is a Ray started here: every replica runs on this host."""
        return not self.ray_address

    @property
    def replica_threads(self) -> int:
        """torch threads per replica: its reserved CPUs, at least one."""
        return max(1, int(self.replica_cpus))

    def check_store(self, server: ServerConfig) -> None:
        """A local Ray may share a directory store (every replica is on this host)."""
        if not self.local:
            require_shared_store(server)


def require_shared_store(server: ServerConfig) -> None:
    """A directory store is shared only by processes on one host; on a Ray cluster replicas
    may land on other machines and would each see a different (or no) copy of it."""
    if "://" not in server.store:
        raise ValueError(
            "a Ray cluster needs a shared store: --store postgresql://USER@HOST:PORT/DB "
            "(a directory is only shared by replicas on one machine)"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``ClusterConfig`` field, defaulting to ``VERA_<NAME>``, then the default."""
    for f in fields(ClusterConfig):
        kind: Any = type(f.default)
        raw = os.environ.get(f"VERA_{f.name.upper()}")
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=f.default if raw is None else kind(raw),
            help=f"{f.metadata['help']} (env VERA_{f.name.upper()})",
        )


def from_args(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig(**{f.name: getattr(args, f.name) for f in fields(ClusterConfig)})

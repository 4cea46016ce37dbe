"""Cluster-wide ``/admin/stats`` and ``/metrics`` from the replicas' reports (pure functions).

``/admin/stats``: ``{"model", "replicas": [per replica: id, pid, node, health, and the single
server's stats], "totals": {...}}``. Totals add up every counter, gauge, rate and byte count
of the replicas (requests, tokens, tokens/s, queue, batch, slots, memory); percentiles are
not additive and stay per replica; store-wide figures (adapters stored, disk) are the same
for every replica of a shared store and are reported once.

``/metrics``: each replica's families merged into one exposition, every sample labelled
``replica="<id>"`` (HELP/TYPE once per family, as the text format requires).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from numbers import Number
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from server.cluster.stats_board import ReplicaReport

_PER_REPLICA = {"ttft_ms", "latency_ms", "load_latency_ms", "bytes_per_adapter"}
_STORE_WIDE = {"stored", "disk", "num_params_per_adapter"}


def cluster_stats(reports: list[ReplicaReport]) -> dict[str, Any]:
    replicas = [
        {
            "replica": r.replica,
            "pid": r.pid,
            "node": r.node,
            "healthy": r.healthy,
            "report_age_s": r.age_s,
            **r.stats,
        }
        for r in reports
    ]
    stats = [r.stats for r in reports]
    totals: dict[str, Any] = {
        "replicas": len(reports),
        "healthy_replicas": sum(r.healthy for r in reports),
        **_add_up(stats),
    }
    if stats and isinstance(stats[0].get("adapters"), dict):
        for key in _STORE_WIDE & stats[0]["adapters"].keys():
            totals.setdefault("adapters", {})[key] = stats[0]["adapters"][key]
    model = stats[0].get("model") if stats else None
    return {"model": model, "replicas": replicas, "totals": totals}


def _add_up(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Key-wise sum of numbers, recursing into dicts; skips non-additive keys and text."""
    out: dict[str, Any] = {}
    keys = dict.fromkeys(k for d in dicts for k in d)  # first-seen order
    for key in keys:
        if key in _PER_REPLICA or key in _STORE_WIDE:
            continue
        values = [d[key] for d in dicts if d.get(key) is not None]
        if values and all(isinstance(v, dict) for v in values):
            out[key] = _add_up(values)
        elif values and all(_is_number(v) for v in values):
            total = sum(values)
            out[key] = round(total, 3) if isinstance(total, float) else total
    return out


def _is_number(value: object) -> bool:
    return isinstance(value, Number) and not isinstance(value, bool)


def cluster_metrics(reports: list[ReplicaReport]) -> bytes:
    registry = CollectorRegistry()
    registry.register(_Relabelled(reports))
    return generate_latest(registry)


class _Relabelled:
    """A collector yielding the replicas' families, each sample with its replica label."""

    def __init__(self, reports: Iterable[ReplicaReport]) -> None:
        self.reports = list(reports)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for report in self.reports:
            for family in text_string_to_metric_families(report.metrics):
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                into.samples += [
                    Sample(s.name, {**s.labels, "replica": report.replica}, *s[2:])
                    for s in family.samples
                ]
        yield from merged.values()

"""GET /metrics: Prometheus text format, read from the engine and store at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from server.engine import Sequence
    from server.runtime import Runtime

router = APIRouter()

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _RuntimeCollector:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        rt, eng = self.rt, self.rt.engine
        pool = rt.pool.stats()
        yield GaugeMetricFamily("vera_queue_depth", "requests waiting", value=eng.queue_depth())
        yield GaugeMetricFamily("vera_running_batch", "sequences decoding", value=eng.running())
        yield GaugeMetricFamily("vera_kv_cache_bytes", "KV cache bytes", value=eng.kv_cache_bytes())
        yield GaugeMetricFamily(
            "vera_tokens_per_second", "recent output tokens/s", value=eng.stats.tokens_per_s()
        )
        yield CounterMetricFamily("vera_requests", "requests submitted", value=eng.stats.submitted)
        yield CounterMetricFamily(
            "vera_completion_tokens", "tokens generated", value=eng.stats.completion_tokens
        )
        yield CounterMetricFamily(
            "vera_training_seconds",
            "engine time spent on fine-tuning units",
            value=eng.background.seconds,
        )
        yield CounterMetricFamily(
            "vera_preemptions",
            "rows taken back from a user over its fair share",
            value=eng.stats.preemptions,
        )
        yield CounterMetricFamily(
            "vera_shared_prompt_tokens",
            "prompt positions copied from a live request's or the prefix cache's K/V instead "
            "of computed",
            value=eng.scheduler.shared_tokens,
        )
        yield CounterMetricFamily(  # its bytes: vera_prefix_cache_bytes, with the memory
            "vera_prefix_cache_hit_tokens",
            "prompt positions restored from the prefix cache",
            value=eng.scheduler.prefixes.hit_tokens,
        )
        yield CounterMetricFamily(
            "vera_rate_limited_requests",
            "requests refused by a per-user rate limit",
            value=rt.tenants.limiter.refused,
        )
        tenants = eng.scheduler.tenants()
        yield GaugeMetricFamily(
            "vera_active_users",
            "users with requests running or waiting (per-user figures: /admin/tenants)",
            value=sum(1 for t in tenants.values() if t["running"] or t["waiting"]),
        )
        fin = CounterMetricFamily("vera_finished_requests", "finished requests", labels=["reason"])
        for reason, n in eng.stats.finish_reasons.items():
            fin.add_metric([reason], n)
        yield fin
        for key in ("slots_total", "slots_used", "slots_free", "slots_pinned"):
            if key in pool:
                yield GaugeMetricFamily(
                    f"vera_adapter_{key}", key.replace("_", " "), value=pool[key]
                )
        for key in ("hits", "misses", "evictions", "unverified"):
            if key in pool:
                yield CounterMetricFamily(
                    f"vera_adapter_{key}", f"adapter slot {key}", value=pool[key]
                )
        heap = rt.heap.stats()
        if heap["available"]:
            yield GaugeMetricFamily(
                "vera_heap_free_bytes", "free memory malloc holds", value=heap["free_bytes"]
            )
            yield CounterMetricFamily(
                "vera_heap_released_bytes",
                "RSS given back to the OS by trimming the heap while idle",
                value=heap["released_bytes"],
            )
        for key, value in rt.memory().items():
            if key != "kv_cache_bytes":  # already a family above: names must be unique
                yield GaugeMetricFamily(f"vera_{key}", key.replace("_", " "), value=value)


class _LatencyHistograms:
    """A ``FinishObserver`` of the engine: each finished request's TTFT and latency."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ttft = Histogram(
            "vera_ttft_seconds", "time to first token", buckets=_BUCKETS, registry=registry
        )
        self.latency = Histogram(
            "vera_request_seconds", "request latency", buckets=_BUCKETS, registry=registry
        )

    def finished(self, seq: Sequence, reason: str) -> None:
        if seq.first_token_at is not None:
            self.ttft.observe(seq.first_token_at - seq.arrival)
        if seq.finished_at is not None:
            self.latency.observe(seq.finished_at - seq.arrival)


def make_registry(rt: Runtime) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_RuntimeCollector(rt))
    rt.engine.stats.observers.append(_LatencyHistograms(registry))
    return registry


# Declared as text/plain so the OpenAPI schema matches what Prometheus scrapes (not JSON).
@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    data = generate_latest(request.app.state.metrics_registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)

"""``vera-serve cluster``, the pieces that need no running Ray: routing key and policy, the
relay into an ASGI app, the route-shaped error events, aggregation of stats and metrics,
configuration, and the docker files."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from server.cli import build_parser
from server.cluster import config as cluster_config
from server.cluster.aggregate import cluster_metrics, cluster_stats
from server.cluster.forwarding import HttpRequest, ResponseHead, replay
from server.cluster.gateway import stream_error_events
from server.cluster.routing import PlacementLedger, rank_replicas, routing_key
from server.cluster.stats_board import ReplicaReport
from server.config import ServerConfig

REPO = Path(__file__).resolve().parents[2]


def _request(path: str, body: object = b"", token: str | None = None) -> HttpRequest:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = ((b"authorization", f"Bearer {token}".encode()),) if token else ()
    return HttpRequest("POST", path, b"", headers, data)


# -- routing ------------------------------------------------------------------------------
def test_routing_key_is_the_user_the_request_is_for() -> None:
    assert routing_key(_request("/users/alice/adapter", b"\x00raw")) == "alice"
    assert routing_key(_request("/generate", {"user_id": "bob", "prompt": "x"})) == "bob"
    assert routing_key(_request("/v1/chat/completions", {"model": "carol"})) == "carol"
    assert routing_key(_request("/generate", {"prompt": "x"})) == ""  # base model, no key
    keyed = routing_key(_request("/v1/completions", {"model": "base"}, token="vk-secret"))
    assert keyed.startswith("key:") and "secret" not in keyed
    assert keyed == routing_key(_request("/v1/models", token="vk-secret"))  # stable per key
    assert routing_key(_request("/generate", b"{not json", token="t")).startswith("key:")


def test_rank_replicas_prefers_warm_replica_within_slack_only() -> None:
    warm = SimpleNamespace(replica_id="w", multiplexed_model_ids={"u"})
    cold = [SimpleNamespace(replica_id=f"c{i}", multiplexed_model_ids=set()) for i in range(3)]
    loads = {"w": 5, "c0": 2, "c1": 3, "c2": 2}
    for _ in range(20):
        ranks = rank_replicas([warm, *cold], "u", lambda r: loads[r.replica_id], slack=3)
        assert ranks[0] == [warm] and all(len(rank) == 1 for rank in ranks)  # 5 <= 2 + 3
        assert len(ranks) in (2, 3) and warm not in [r for (r,) in ranks[1:]]
    loads.update(w=6, c1=2)  # one request past the slack: power of two, lighter first
    for _ in range(20):
        ranks = rank_replicas([warm, *cold], "u", lambda r: loads[r.replica_id], slack=3)
        first, second = (loads[r.replica_id] for (r,) in ranks)
        assert len(ranks) == 2 and first <= second
    assert len(rank_replicas([warm, *cold], "", lambda r: 0, slack=3)) == 2  # no key: pow-2
    assert rank_replicas([], "u", lambda r: 0, slack=3) == []


def test_placement_ledger_counts_a_burst_before_ray_hears_of_it() -> None:
    now = [0.0]
    ledger = PlacementLedger(ttl_s=30, clock=lambda: now[0])
    for i in range(5):
        ledger.place(f"r{i}", "w")
    assert ledger.count("w") == 5 and ledger.count("c") == 0
    ledger.confirm("r4", "c")  # the first rank refused it; another replica took it
    assert ledger.count("w") == 4 and ledger.count("c") == 1
    ledger.done("r3", "c")  # a late rejection callback from the wrong replica changes nothing
    assert ledger.count("w") == 4
    ledger.done("r3", "w")
    ledger.confirm("r0", "w")
    assert ledger.count("w") == 3
    now[0] = 31.0  # never-confirmed placements (cancelled while routing) expire; confirmed stay
    assert ledger.count("w") == 1 and ledger.count("c") == 1
    ledger.done("r0", "w")
    ledger.done("r4", "c")
    assert ledger.count("w") == ledger.count("c") == 0


# -- relay ----------------------------------------------------------------------------------
def _echo_app(cancelled: list[bool]) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"body": (await request.body()).decode(), "q": request.url.query}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def events():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_replay_answers_like_the_app_and_stops_it_when_the_consumer_leaves() -> None:
    cancelled: list[bool] = []
    app = _echo_app(cancelled)

    async def run() -> None:
        items = [x async for x in replay(app, HttpRequest("POST", "/echo", b"a=1", (), b"hi"))]
        assert len(items) == 1 and isinstance(items[0], ResponseHead)  # one item: head + body
        assert items[0].status == 200 and json.loads(items[0].body) == {"body": "hi", "q": "a=1"}
        missing = [x async for x in replay(app, HttpRequest("GET", "/nope", b"", (), b""))]
        assert missing[0].status == 404
        stream = replay(app, HttpRequest("GET", "/stream", b"", (), b""))
        head = await stream.__anext__()
        assert head.is_event_stream and head.body.startswith(b"data: 0")
        await stream.__anext__()
        await stream.aclose()  # the client went away
        await asyncio.sleep(0.05)

    asyncio.run(run())
    assert cancelled == [True]


def test_stream_error_events_have_each_routes_shape() -> None:
    native = stream_error_events(_request("/generate", {"user_id": "u"}), "lost")
    (event,) = [json.loads(x[6:]) for x in native.decode().split("\n\n") if x]
    assert event["type"] == "done" and event["finish_reason"] == "error"
    assert event["user_id"] == "u" and event["error"] == "lost"
    openai = stream_error_events(_request("/v1/chat/completions", {"model": "u"}), "lost")
    first, last = [x[6:] for x in openai.decode().split("\n\n") if x]
    assert json.loads(first) == {
        "error": {"message": "lost", "type": "replica_unavailable", "code": 503}
    }
    assert last == "[DONE]"


# -- aggregation ------------------------------------------------------------------------------
class _Families:
    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self) -> list:
        return self.families


def _report(replica: str, submitted: int, rss: int) -> ReplicaReport:
    stats = {
        "model": "m",
        "memory": {"host_rss_bytes": rss},
        "adapters": {"stored": 7, "hits": submitted, "bytes_per_adapter": 10},
        "engine": {
            "requests_submitted": submitted,
            "tokens_per_s": 1.5,
            "finish_reasons": {"length": submitted},
            "ttft_ms": {"p50": 3.0},
        },
    }
    finished = CounterMetricFamily("vera_finished_requests", "finished", labels=["reason"])
    finished.add_metric(["length"], submitted)
    families = [CounterMetricFamily("vera_requests", "submitted", value=submitted), finished]
    metrics = generate_latest(_Families(families)).decode()  # as a replica's /metrics
    return ReplicaReport(replica, 100, "10.0.0.1", True, stats, metrics)


def test_cluster_stats_add_up_counters_and_keep_store_wide_figures_once() -> None:
    out = cluster_stats([_report("a", 3, 100), _report("b", 4, 200)])
    assert [r["replica"] for r in out["replicas"]] == ["a", "b"]
    assert out["replicas"][0]["engine"]["ttft_ms"] == {"p50": 3.0}
    totals = out["totals"]
    assert totals["replicas"] == 2 and totals["healthy_replicas"] == 2
    assert totals["engine"]["requests_submitted"] == 7
    assert totals["engine"]["tokens_per_s"] == 3.0
    assert totals["engine"]["finish_reasons"] == {"length": 7}
    assert "ttft_ms" not in totals["engine"]  # percentiles do not add up
    assert totals["memory"]["host_rss_bytes"] == 300
    assert totals["adapters"] == {"hits": 7, "stored": 7}


def test_cluster_metrics_label_every_sample_with_its_replica() -> None:
    text = cluster_metrics([_report("a", 3, 100), _report("b", 4, 200)]).decode()
    assert text.count("# TYPE vera_requests_total counter") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = [s for f in families.values() for s in f.samples if not s.name.endswith("_created")]
    assert {(s.labels["replica"], s.value) for s in samples if s.name == "vera_requests_total"} == {
        ("a", 3.0),
        ("b", 4.0),
    }
    assert all("replica" in s.labels for s in samples)
    finished = [s for s in samples if s.name == "vera_finished_requests_total"]
    assert {s.labels["reason"] for s in finished} == {"length"} and len(finished) == 2


# -- configuration -------------------------------------------------------------------------------
def test_cluster_config_and_cli_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["cluster", "--replicas", "3", "--max-batch", "8"])
    cfg = cluster_config.from_args(args)
    assert cfg.replicas == 3 and cfg.local and args.max_batch == 8
    with pytest.raises(ValueError, match="replicas"):
        cluster_config.ClusterConfig(replicas=0)
    joined = cluster_config.ClusterConfig(ray_address="10.0.0.1:6379")
    with pytest.raises(ValueError, match="shared store"):
        joined.check_store(ServerConfig(store="/data/store"))
    joined.check_store(ServerConfig(store="postgresql://vera@db:5432/vera"))
    cfg.check_store(ServerConfig(store="/data/store"))  # local Ray: one host, one directory

    from server.cluster.app import app_builder

    monkeypatch.delenv("VERA_ADMIN_TOKEN", raising=False)
    with pytest.raises(ValueError, match="VERA_ADMIN_TOKEN"):
        app_builder({"store": "postgresql://vera@db:5432/vera"})
    monkeypatch.setenv("VERA_ADMIN_TOKEN", "t" * 32)
    with pytest.raises(ValueError, match="shared store"):
        app_builder({"store": "/data/store", "replicas": 2})


def test_docker_files_parse() -> None:
    compose = yaml.safe_load((REPO / "docker/compose.yaml").read_text())
    scale = {n: s for n, s in compose["services"].items() if "scale" in s.get("profiles", [])}
    assert "postgres" in scale and any("cluster" in s.get("command", []) for s in scale.values())
    assert "vera" in compose["services"] and "profiles" not in compose["services"]["vera"]
    service = yaml.safe_load((REPO / "docker/rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["applications"][0]["import_path"] == "server.cluster.app:app_builder"

"""Monitoring with Prometheus and Grafana: a real Prometheus scrapes a live server's /metrics;
the Grafana dashboard asks only for metrics that server exposes, in PromQL that Prometheus
accepts and answers; /metrics stays bounded (no per-user labels); the compose profile
``monitoring`` wires Prometheus and Grafana to the server and the dashboard."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from busy_server import USERS, BusyServer, Load
from live import free_port
from prometheus_client.parser import text_string_to_metric_families
from system_tools import system_tool

DOCKER = Path(__file__).resolve().parents[2] / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "vera-serve.json"
# Runtime.memory reports these on CUDA devices only; the dashboard's memory panel shows them
# there, so on a CPU server they are the only names it may ask for that /metrics lacks.
DEVICE_ONLY = {"vera_device_allocated_bytes", "vera_device_reserved_bytes"}
BOUNDED_LABELS = {"reason", "le"}  # finish reasons, histogram buckets: fixed sets


def exposition(url: str) -> list[Any]:
    return list(text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text))


def sample_names(url: str) -> set[str]:
    return {s.name for family in exposition(url) for s in family.samples}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def queries(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(board) for t in p["targets"]]


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"and", "or", "unless"}


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression reads: every name left once strings, label matchers,
    ranges, grouping label lists, function calls, keywords and numbers are set aside."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', " ", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][\w:]*", expr):
        called = expr[match.end() :].lstrip().startswith("(")
        if not called and match.group() not in _KEYWORDS:
            names.add(match.group())
    return names


def variable_metrics(board: dict[str, Any]) -> set[str]:
    """The metrics the dashboard's variables read (``label_values(metric, label)``)."""
    found = set()
    for variable in board["templating"]["list"]:
        match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["definition"])
        assert match, variable["definition"]
        found.add(match.group(1))
    return found


def as_prometheus(expr: str) -> str:
    """Grafana's variables as Prometheus would see them on this test's scrape interval."""
    return expr.replace("$__rate_interval", "30s").replace("$job", ".*")


@pytest.fixture(scope="module")
def prometheus(busy: BusyServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus on a free port scraping the busy server every second; its URL."""
    binary = system_tool("prometheus", "prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    target = busy.live.url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "vera", "static_configs": [{"targets": [target]}]}],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = folder / "prometheus.log"
    cmd = [
        str(binary),
        f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while not _ready(url):
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, "prometheus did not become ready:\n" + log.read_text()
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def wait_for(what, timeout: float = 30.0, every: float = 0.5):
    deadline = time.time() + timeout
    while True:
        got = what()
        if got or time.time() > deadline:
            return got
        time.sleep(every)


def test_prometheus_scrapes_the_live_server(busy: BusyServer, prometheus: str) -> None:
    def tokens() -> float:
        result = query(prometheus, 'vera_completion_tokens_total{job="vera"}')
        return float(result[0]["value"][1]) if result else 0.0

    with Load(busy, per_user=1, max_new_tokens=16):
        assert wait_for(lambda: tokens() > 0), "no vera_completion_tokens_total > 0 scraped"
        ttft = (
            'histogram_quantile(0.5, sum by (le) (rate(vera_ttft_seconds_bucket{job="vera"}[30s])))'
        )
        p50 = wait_for(lambda: [r for r in query(prometheus, ttft) if float(r["value"][1]) > 0])
    assert p50, "no TTFT quantile from the scraped histogram"
    up = query(prometheus, 'up{job="vera"}')
    assert [float(r["value"][1]) for r in up] == [1.0]


def test_dashboard_asks_only_for_exposed_metrics(busy: BusyServer, prometheus: str) -> None:
    board = dashboard()
    exposed = sample_names(busy.live.url)
    with busy.live.admin() as c:
        on_cuda = c.get("/admin/stats").json()["device"].startswith("cuda")
    allowed = exposed if on_cuda else exposed | DEVICE_ONLY
    asked = {name for expr in queries(board) for name in metric_names(expr)}
    asked |= variable_metrics(board)
    assert len(asked) >= 15, asked
    assert not asked - allowed, f"not exposed by /metrics: {sorted(asked - allowed)}"
    assert not DEVICE_ONLY & exposed or on_cuda

    def every_panel_answers() -> list[str]:
        silent = []
        for panel in panels(board):
            exprs = [as_prometheus(t["expr"]) for t in panel["targets"]]
            if not any(query(prometheus, e) for e in exprs):
                silent.append(panel["title"])
        return silent

    with Load(busy, per_user=1, max_new_tokens=16):
        wait_for(lambda: not every_panel_answers(), timeout=20)
        silent = every_panel_answers()
    assert not silent, f"panels without data: {silent}"


def test_every_metric_family_is_exposed_once(busy: BusyServer) -> None:
    """A name exposed twice makes the scrape invalid (Prometheus drops the duplicates)."""
    text = httpx.get(f"{busy.live.url}/metrics", timeout=10).text
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert {"vera_prefix_cache_bytes", "vera_prefix_cache_hit_tokens_total"} <= set(names)
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_metrics_carry_no_per_user_labels(busy: BusyServer) -> None:
    labels = {k for family in exposition(busy.live.url) for s in family.samples for k in s.labels}
    assert labels <= BOUNDED_LABELS, labels
    text = httpx.get(f"{busy.live.url}/metrics", timeout=10).text
    assert not [u for u in USERS if u in text]


def test_dashboard_panels_are_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "vera-serve" and board["panels"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]


def test_compose_monitoring_profile_wires_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), volume
            else:
                assert source in compose["volumes"], volume
    assert "profiles" not in services["vera"]  # the server itself runs in every profile

    scrape = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = {
        t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    ports = {s: services[s]["ports"][0].split(":")[-1].strip('"') for s in ("vera", "vera-cluster")}
    assert targets == {f"{s}:{port}" for s, port in ports.items()}
    promtool = system_tool("promtool", "prometheus")
    check = subprocess.run(
        [str(promtool), "check", "config", str(DOCKER / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr

    grafana = DOCKER / "grafana" / "provisioning"
    sources = yaml.safe_load((grafana / "datasources" / "prometheus.yaml").read_text())
    source = sources["datasources"][0]
    assert source["uid"] == "prometheus" and source["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((grafana / "dashboards" / "vera-serve.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == path and mounts["./grafana/provisioning"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/{DASHBOARD.name}"


def test_metric_names_sees_through_promql() -> None:
    expr = 'a / (sum by (le) (rate(b{x="c(d)"}[5m])) + 1e-9) and on(job) up offset 5m'
    assert metric_names(expr) == {"a", "b", "up"}

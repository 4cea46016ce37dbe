"""The admin console in a real headless Chromium (Playwright) against a live server with real
traffic: nothing shown before the admin token, a user key refused with a visible message, the
token kept out of storage and cookies, charts drawn from the traffic (history, fair share,
usage, loss curves), missing views and a cluster's replicas; full-page screenshots are saved to
``$VERA_TEST_ARTIFACTS/console`` (or a temporary folder) and their paths printed."""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from busy_server import TRAINED, USERS, BusyServer, Load
from live import ADMIN
from system_tools import system_tool

import server.api
from server.api.console import ASSETS

try:
    from playwright import sync_api
except ImportError:  # in the test extra: a bare environment skips, CI fails
    if os.environ.get("CI"):
        raise
    pytest.skip("playwright is not installed: pip install -e '.[test]'", allow_module_level=True)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HISTORY_CHARTS = (
    "chart-throughput",
    "chart-ttft",
    "chart-queue",
    "chart-tiers",
    "chart-tier-bytes",
    "chart-memory",
)
SVG_NS = "http://www.w3.org/2000/svg"


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    chromium = system_tool("chromium", "chromium")
    with sync_api.sync_playwright() as p:
        # headless, fresh profile (Playwright's default); never a downloaded browser
        b = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, busy: BusyServer) -> Iterator[sync_api.Page]:
    """A fresh tab; fails the test on a script error or a request to any other origin."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda e: problems.append(f"script error: {e}"))
    tab.on(
        "request",
        lambda r: r.url.startswith(busy.live.url) or problems.append(f"external: {r.url}"),
    )
    yield tab
    context.close()
    assert not problems


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = os.environ.get("VERA_TEST_ARTIFACTS")
    folder = Path(root) / "console" if root else tmp_path_factory.mktemp("console-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(tab: sync_api.Page, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    tab.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def open_console(tab: sync_api.Page, busy: BusyServer, token: str) -> None:
    tab.goto(f"{busy.live.url}/admin/console")
    tab.fill("#token", token)
    tab.click("#login-form button[type=submit]")


def points(tab: sync_api.Page, selector: str) -> list[tuple[float, float]]:
    """The (x, y) vertices of the first SVG path matching ``selector``."""
    d = tab.locator(selector).first.get_attribute("d") or ""
    return [(float(x), float(y)) for x, y in re.findall(r"(-?[\d.]+),(-?[\d.]+)", d)]


def wait_points(tab: sync_api.Page, selector: str, at_least: int) -> None:
    tab.wait_for_function(
        "([sel, n]) => { const p = document.querySelector(sel); "
        "return p && Number(p.dataset.points) >= n; }",
        arg=[selector, at_least],
        timeout=20_000,
    )


def test_page_is_public_static_and_loads_only_its_own_files(busy: BusyServer) -> None:
    with httpx.Client(base_url=busy.live.url, timeout=10) as c:  # no token at all
        r = c.get("/admin/console")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        sources = r.text
        for name in ASSETS:
            asset = c.get(f"/admin/console/{name}")
            assert asset.status_code == 200, name
            assert asset.headers["content-type"].split(";")[0] in ("text/css", "text/javascript")
            assert f"console/{name}" in r.text  # the page loads every file it ships
            sources += asset.text
        for bad in ("nope.js", "..%2Fconsole.py", "console.html"):
            assert c.get(f"/admin/console/{bad}").status_code == 404, bad
        assert c.get("/admin/history").status_code == 401  # the data is not public
    assert not re.findall(r"https?://", sources.replace(SVG_NS, ""))  # nothing external
    for kept in ("localStorage", "sessionStorage", "document.cookie", "indexedDB"):
        assert kept not in sources  # the token is kept nowhere but in a variable


def test_the_package_ships_every_file_the_page_loads() -> None:
    static = Path(server.api.__file__).parent / "static"
    files = {p.name for p in static.iterdir()}
    assert files == {"console.html", *ASSETS}  # nothing served that is not shipped, or back
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    line = re.search(r'(?m)^"server\.api" = (\[.*\])$', pyproject)  # package-data (Python 3.10:
    assert line, "pyproject.toml ships no package data for server.api"  # no tomllib)
    globs = json.loads(line.group(1))
    for name in files:
        assert any(fnmatch.fnmatch(f"static/{name}", g) for g in globs), name


def test_history_is_admin_only_and_follows_the_traffic(busy: BusyServer) -> None:
    with busy.live.client(busy.keys["alice"]) as c:
        r = c.get("/admin/history")
        assert r.status_code == 403 and "admin token" in r.json()["error"]["message"]
    with busy.live.admin() as c:
        cols = c.get("/admin/history").json()["columns"]
        assert len({len(v) for v in cols.values()}) == 1 and len(cols["t"]) >= 2
        assert max(v or 0 for v in cols["tokens_per_s"]) > 0
        assert max(v or 0 for v in cols["device_adapters"]) >= 1
        assert cols["disk_adapters"][-1] == len(USERS) and cols["disk_bytes"][-1] > 0
        assert cols["ttft_p50_ms"][-1] > 0 and cols["host_rss_bytes"][-1] > 0
        since = cols["t"][-2]
        newer = c.get("/admin/history", params={"since": since}).json()["columns"]
        assert newer["t"] and min(newer["t"]) > since


def test_console_draws_the_live_traffic(page, busy: BusyServer, shots: Path) -> None:
    page.goto(f"{busy.live.url}/admin/console")
    assert page.locator("#dashboard").is_hidden()  # nothing until the token is given
    assert page.locator("svg path").count() == 0
    with Load(busy):
        open_console(page, busy, ADMIN)
        page.wait_for_selector("#dashboard", state="visible")
        for chart in HISTORY_CHARTS:
            wait_points(page, f"#{chart} path.line", 3)
        wait_points(page, f'[data-job="{busy.job_id}"] path.line', 2)  # the loss curve
        page.wait_for_function(  # every user in the engine at one poll (the load's 6 > 3 rows)
            "users => users.every(u => document.querySelector("
            "`#chart-fair rect[data-row='${u}']`))",
            arg=list(USERS),
            timeout=20_000,
        )
        shot = screenshot(page, shots, "console-live")

    ys = [y for _, y in points(page, "#chart-throughput path.line")]
    assert min(ys) < max(ys)  # tokens/s moved with the traffic
    tiers = [y for _, y in points(page, '#chart-tiers path[data-series="device_adapters"]')]
    assert min(tiers) < max(tiers)  # none on device at start, then the users' adapters
    kpis = page.inner_text("#kpis")
    assert f"{len(USERS)} stored" in kpis and "tok/s" in kpis

    fair = page.locator("#fair-share")
    usage = page.locator("#top-users")
    for user in USERS:
        assert fair.locator(f'#chart-counters rect[data-row="{user}"]').count() == 1, user
        row = usage.locator(f'tr[data-user="{user}"]')
        assert row.count() == 1 and user in row.inner_text()
        assert int(row.locator("svg.spark path.line").get_attribute("data-points") or 0) == 60
    assert "scheduling:" in fair.inner_text()

    job = page.locator(f'[data-job="{busy.job_id}"]')
    assert TRAINED in job.inner_text() and "succeeded" in job.inner_text()
    loss = points(page, f'[data-job="{busy.job_id}"] path.line')
    assert len(loss) >= 2 and len({y for _, y in loss}) > 1

    box = page.locator("#chart-throughput svg").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] / 2)
    page.wait_for_function(  # and it stays through the redraws of the next polls
        "() => document.querySelector('#chart-throughput .tooltip:not([hidden])')"
        "?.innerText.includes('tok/s')"
    )
    page.wait_for_timeout(3500)
    assert "tok/s" in page.locator("#chart-throughput .tooltip").inner_text()
    assert page.locator("#replicas").is_hidden()  # a single server

    stored = page.evaluate("() => JSON.stringify([localStorage, sessionStorage, document.cookie])")
    assert ADMIN not in stored and page.context.cookies() == []
    assert ADMIN not in page.content() and ADMIN not in page.url
    assert shot.stat().st_size > 50_000


def test_a_user_key_is_refused_with_a_visible_message(page, busy: BusyServer, shots) -> None:
    open_console(page, busy, busy.keys["alice"])
    error = page.locator("#login-error")
    error.wait_for(state="visible")
    assert "user API key" in error.inner_text() and "403" in error.inner_text()
    assert page.locator("#dashboard").is_hidden() and page.input_value("#token") == ""
    screenshot(page, shots, "console-user-key-refused")
    open_console(page, busy, "not-a-key")
    page.wait_for_function("() => document.querySelector('#login-error').innerText.includes('401')")
    assert page.locator("#dashboard").is_hidden()


def cluster_stats(single: dict) -> dict:
    """The gateway's /admin/stats shape (server/cluster/aggregate.py) for two replicas."""
    replicas = [
        {"replica": "vera#a1", "pid": 101, "node": "10.0.0.1", "healthy": True, **single},
        {"replica": "vera#b2", "pid": 202, "node": "10.0.0.2", "healthy": False, **single},
    ]
    for r in replicas:
        r["report_age_s"] = 0.4
    engine = {k: v for k, v in single["engine"].items() if k not in ("ttft_ms", "latency_ms")}
    totals = {"replicas": 2, "healthy_replicas": 1, "engine": engine}
    totals |= {key: single[key] for key in ("memory", "adapters", "fine_tuning")}
    return {"model": single["model"], "replicas": replicas, "totals": totals}


def test_missing_views_and_a_cluster_of_replicas(page, busy: BusyServer, shots) -> None:
    with busy.live.admin() as c:
        cluster = cluster_stats(c.get("/admin/stats").json())
    not_found = {"error": {"message": "Not Found", "type": "http_error", "code": 404}}
    page.route("**/admin/stats", lambda route: route.fulfill(json=cluster))
    for pattern in ("**/admin/tenants", "**/v1/organization/usage/**"):
        page.route(pattern, lambda route: route.fulfill(status=404, json=not_found))
    open_console(page, busy, ADMIN)
    page.wait_for_selector('#replicas tr[data-replica="vera#b2"]')
    page.wait_for_selector("#fair-share .notice.unavailable")
    for panel in ("#fair-share", "#top-users"):
        text = page.inner_text(panel)
        assert "Not available" in text and "404" in text, text
    assert page.locator("#replicas tbody tr").count() == 2
    assert "1/2 replicas healthy" in page.inner_text("#server-info")
    assert "down" in page.inner_text('#replicas tr[data-replica="vera#b2"]')
    assert page.locator("#history-note").is_visible()
    screenshot(page, shots, "console-cluster-without-tenants")

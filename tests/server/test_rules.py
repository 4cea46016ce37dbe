"""The API's rules over HTTP: tenant isolation, limits, errors that say what is wrong,
cancellation on disconnect, draining on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from live import LiveServer, adapter_bytes, random_adapter, start_server

OCTET = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def keys(live: LiveServer, ref_vm) -> dict[str, str]:
    out = {}
    for uid, seed in (("erin", 31), ("frank", 32)):
        out[uid] = live.new_user(uid)
        with live.client(out[uid]) as c:
            assert (
                c.put(
                    f"/users/{uid}/adapter",
                    content=adapter_bytes(random_adapter(ref_vm, seed)),
                    headers=OCTET,
                ).status_code
                == 201
            )
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Tight limits, fallback to the base model for unknown users."""
    server = start_server(
        tmp_path_factory.mktemp("small"),
        "--max-batch",
        "1",
        "--max-waiting",
        "2",
        "--max-body-mb",
        "0.5",
        "--max-seq-len",
        "128",
        "--fallback-to-base",
        "--device-slots",
        "2",
        admin_token=None,
    )
    yield server
    server.stop()


def error_of(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return body["error"]["message"]


def test_user_key_only_reaches_its_own_adapter(live: LiveServer, keys, ref_vm) -> None:
    with live.client(keys["erin"]) as c:
        gen = {"user_id": "frank", "prompt": "hi", "max_new_tokens": 2}
        for r in (
            c.post("/generate", json=gen),
            c.get("/users/frank/adapter"),
            c.delete("/users/frank/adapter"),
            c.put(
                "/users/frank/adapter",
                content=adapter_bytes(random_adapter(ref_vm, 5)),
                headers=OCTET,
            ),
            c.post("/v1/completions", json={"model": "frank", "prompt": "hi", "max_tokens": 2}),
            c.post(
                "/v1/chat/completions",
                json={"model": "frank", "messages": [{"role": "user", "content": "hi"}]},
            ),
        ):
            assert r.status_code == 403, r.text
            assert "frank" not in r.text  # no other user's id in errors
        assert c.get("/users/erin/adapter").status_code == 200
        ok = c.post("/generate", json={**gen, "user_id": "erin"})
        assert ok.status_code == 200 and ok.json()["adapter_version"] == 1
        models = {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert "frank" not in models and "erin" in models
    with live.admin() as c:  # frank's adapter is untouched
        assert c.get("/users/frank/adapter").json()["version"] == 1


def test_admin_endpoints_refuse_user_keys_and_strangers(live: LiveServer, keys) -> None:
    with live.client(keys["erin"]) as c:
        assert c.get("/admin/stats").status_code == 403
        r = c.post("/admin/users", json={"user_id": "mallory"})
        assert r.status_code == 403 and "admin" in error_of(r)
    with live.client() as c:
        r = c.get("/admin/stats")
        assert r.status_code == 401 and "Bearer" in error_of(r)
    with live.client("vk-not-a-real-key") as c:
        r = c.post("/generate", json={"prompt": "hi"})
        assert r.status_code == 401 and error_of(r) == "invalid API key"
    with live.admin() as c:
        assert c.post("/admin/users", json={"user_id": "erin"}).status_code == 409
        stats = c.get("/admin/stats").json()
        assert stats["memory"]["base_model_bytes"] > 100e6
        # fp32 on a CPU: the engine's linears also hold weights prepacked for oneDNN
        packed, fp32 = stats["memory"]["packed_weights_bytes"], stats["dtype"] == "float32"
        assert stats["engine"]["decode"]["packed_weights"] == fp32
        assert packed > stats["memory"]["base_model_bytes"] // 2 if fp32 else packed == 0
        assert stats["adapters"]["bytes_per_adapter"] == 38400 * 4


def test_keys_are_stored_hashed(live: LiveServer, keys) -> None:
    raw = (live.store / "vera.sqlite").read_bytes()
    for k in keys.values():
        assert k.encode() not in raw
    wal = live.store / "vera.sqlite-wal"
    if wal.exists():
        assert all(k.encode() not in wal.read_bytes() for k in keys.values())


def test_bad_requests_say_what_is_wrong(live: LiveServer) -> None:
    with live.admin() as c:
        r = c.post(
            "/generate", json={"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}
        )
        assert r.status_code == 422 and "exactly one" in error_of(r)
        r = c.post("/generate", json={"prompt": "hi", "temperature": -1})
        assert r.status_code == 422 and "temperature" in error_of(r)
        r = c.post("/generate", json={"prompt": "hi", "max_new_tokens": 8000})
        assert r.status_code == 400 and "context" in error_of(r)
        r = c.post("/generate", json={"user_id": "../etc", "prompt": "hi"})
        assert r.status_code == 422 and "user_id" in error_of(r)  # validated at the edge
        r = c.post("/generate", json={"user_id": "..", "prompt": "hi"})
        assert r.status_code == 422 and "invalid user id" in error_of(r)
        r = c.put("/users/..%2Fx/adapter", content=b"x", headers=OCTET)
        assert r.status_code in (400, 404)
        r = c.put("/users/zed/adapter", content=b"garbage" * 10, headers=OCTET)
        assert r.status_code == 400 and "safetensors" in error_of(r)
        r = c.put("/users/zed/adapter", content=b"{}", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and "Content-Type" in error_of(r)
        r = c.post("/generate", json={"user_id": "nobody-here", "prompt": "hi"})
        assert r.status_code == 404 and "no adapter" in error_of(r)
        r = c.post("/generate", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 422


def test_body_limit_413(small: LiveServer) -> None:
    with small.client() as c:
        r = c.put("/users/big/adapter", content=b"\0" * 600_000, headers=OCTET)
        assert r.status_code == 413 and "limit" in error_of(r)


def test_unknown_user_falls_back_to_base_when_flagged(small: LiveServer) -> None:
    with small.client() as c:
        r = c.post("/generate", json={"user_id": "ghost", "prompt": "Hi", "max_new_tokens": 3})
        assert r.status_code == 200 and r.json()["adapter_version"] is None


def test_full_queue_gives_429_with_retry_after(small: LiveServer) -> None:
    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=small.url, timeout=300) as ac:
            body = {"prompt": "Count to one hundred:", "max_new_tokens": 60}
            return await asyncio.gather(*(ac.post("/generate", json=body) for _ in range(8)))

    responses = asyncio.run(flood())
    codes = sorted(r.status_code for r in responses)
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["Retry-After"] and "queued" in error_of(limited)


def wait_idle(server: LiveServer, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    with server.admin() if server.admin_token else server.client() as c:
        while time.time() < deadline:
            stats = c.get("/admin/stats").json()
            if stats["engine"]["running_batch"] == 0 and stats["engine"]["queue_depth"] == 0:
                return stats
            time.sleep(0.2)
    raise AssertionError(f"server not idle: {stats['engine']}")


def test_disconnect_cancels_and_frees_kv(small: LiveServer) -> None:
    wait_idle(small)
    with small.client() as c:
        body = {"prompt": "Write a long story:", "max_new_tokens": 100, "stream": True}
        with c.stream("POST", "/generate", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 6:
                    break  # hang up mid-stream
    stats = wait_idle(small, 30)
    assert stats["engine"]["finish_reasons"].get("cancelled", 0) >= 1
    assert stats["engine"]["kv_cache_bytes"] == 0
    assert stats["adapters"]["slots_pinned"] == 0


def test_hang_up_on_a_non_streaming_request_cancels_it_while_it_generates(
    small: LiveServer,
) -> None:
    before = wait_idle(small)["engine"]["finish_reasons"].get("cancelled", 0)
    body = {"prompt": "Count from 1 to 200: 1, 2, 3,", "max_new_tokens": 100}
    # the client gives up (and closes the connection) long before 100 tokens
    with httpx.Client(base_url=small.url, timeout=1.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/generate", json=body)
    stats = wait_idle(small, 30)
    assert stats["engine"]["finish_reasons"].get("cancelled", 0) == before + 1, stats["engine"]
    assert stats["engine"]["kv_cache_bytes"] == 0
    assert stats["adapters"]["slots_pinned"] == 0


def test_sigterm_drains_in_flight_requests(tmp_path) -> None:
    server = start_server(tmp_path, admin_token=None)
    try:

        async def run() -> httpx.Response:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
                task = asyncio.create_task(
                    ac.post("/generate", json={"prompt": "List ten animals:", "max_new_tokens": 40})
                )
                await asyncio.sleep(1.0)
                server.proc.send_signal(signal.SIGTERM)
                return await task

        r = asyncio.run(run())
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
        # uvicorn re-raises the caught SIGTERM once shutdown is complete
        assert server.proc.wait(60) in (0, -signal.SIGTERM)
        assert "Finished server process" in server.log_text()
    finally:
        server.stop(signal.SIGKILL)


def test_dev_mode_is_loud_and_loopback_only(small: LiveServer) -> None:
    assert "DEV MODE" in small.log_text() and "NO AUTHENTICATION" in small.log_text()
    from server.config import ServerConfig

    with pytest.raises(ValueError, match="VERA_ADMIN_TOKEN"):
        ServerConfig(host="0.0.0.0")
    assert ServerConfig(host="0.0.0.0", admin_token="t").host == "0.0.0.0"


def test_metrics_and_health(live: LiveServer) -> None:
    with live.client() as c:
        assert c.get("/health").json()["status"] == "ok"
        text = c.get("/metrics").text
    for name in (
        "vera_queue_depth",
        "vera_running_batch",
        "vera_ttft_seconds_bucket",
        "vera_adapter_slots_total",
        "vera_base_model_bytes",
    ):
        assert name in text

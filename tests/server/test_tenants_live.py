"""Tenants sharing a real server (``python -m server`` on a tiny random Llama): a flooding user
does not hold off another, its overflow and its rate limits answer 429 to it alone, limits
hold across two replicas on PostgreSQL, and usage adds up to what the clients counted."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
from live import ADMIN, LiveServer, adapter_bytes, build_tiny_model, random_adapter, start_server

from server.model_source import load_model
from vera_core import VeraConfig, inject_vera

R = 16
OCTET = {"Content-Type": "application/octet-stream"}
PROMPT = "Tell me about the sea."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A tiny model and an adapter file for each user of these tests."""
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-tenants"))
    model, _, _ = load_model(str(folder))
    vm = inject_vera(model, VeraConfig(r=R), num_slots=2)
    users = ("flood", "victim", "a", "b")
    return folder, {u: adapter_bytes(random_adapter(vm, i + 1)) for i, u in enumerate(users)}


def serve(workdir: Path, tiny, *args: str, store: str | None = None) -> LiveServer:
    folder, adapters = tiny
    workdir.mkdir(parents=True, exist_ok=True)
    server = start_server(
        workdir, "--model", str(folder), "--r", str(R), "--max-seq-len", "256", *args, store=store
    )
    with server.admin() as c:
        for user, body in adapters.items():
            assert c.put(f"/users/{user}/adapter", content=body, headers=OCTET).status_code == 201
    return server


@pytest.fixture
def keys() -> dict[str, str]:
    return {}


def key_of(server: LiveServer, keys: dict[str, str], user: str) -> str:
    if user not in keys:
        keys[user] = server.new_user(user)
    return keys[user]


def generate(c: httpx.Client, user: str, n: int = 8, **extra) -> httpx.Response:
    return c.post(
        "/generate", json={"user_id": user, "prompt": PROMPT, "max_new_tokens": n} | extra
    )


# -- fair share -----------------------------------------------------------------------------
def test_a_flood_does_not_hold_off_another_user(tmp_path: Path, tiny) -> None:
    server = serve(tmp_path, tiny, "--max-batch", "4", "--max-waiting-per-user", "64")
    finished: list[str] = []

    async def run() -> tuple[int, list[dict]]:
        async with httpx.AsyncClient(
            base_url=server.url, timeout=300, headers={"Authorization": f"Bearer {ADMIN}"}
        ) as c:

            async def flood_one() -> dict:
                body = {"user_id": "flood", "prompt": PROMPT, "max_new_tokens": 48}
                r = await c.post("/generate", json=body)
                finished.append("flood")
                return r.json()

            flood = [asyncio.create_task(flood_one()) for _ in range(24)]
            while True:  # the flood holds every row and has a queue behind it
                t = (await c.get("/admin/tenants")).json()
                rows = {x["user_id"]: x for x in t["tenants"]}
                if rows.get("flood", {}).get("running") == 4 and rows["flood"]["waiting"] >= 12:
                    break
                await asyncio.sleep(0.05)
            body = {"user_id": "victim", "prompt": PROMPT, "max_new_tokens": 8}
            victim = await c.post("/generate", json=body)
            assert victim.status_code == 200 and victim.json()["usage"]["completion_tokens"] == 8
            flood_done_by_then = finished.count("flood")
            return flood_done_by_then, list(await asyncio.gather(*flood))

    try:
        done_before, flood = asyncio.run(run())
        # FIFO would have served the victim after the 20 flood requests queued ahead of it
        assert done_before <= 4, done_before
        # the rows taken back from the flood were recomputed: every flood request completes
        assert all(r["finish_reason"] == "length" for r in flood)
        assert all(r["usage"]["completion_tokens"] == 48 for r in flood)
        with server.admin() as c:
            stats = c.get("/admin/stats").json()["engine"]
            assert stats["scheduling"] == "fair" and stats["preemptions"] >= 1
            metrics = c.get("/metrics").text
            assert "vera_preemptions_total" in metrics and 'user="' not in metrics
    finally:
        server.stop()


# -- the flooder's 429s ---------------------------------------------------------------------
def test_overflow_and_rate_limits_answer_429_to_that_user_only(tmp_path: Path, tiny) -> None:
    server = serve(
        tmp_path, tiny, "--max-batch", "2", "--max-waiting-per-user", "3", "--max-waiting", "64"
    )
    keys: dict[str, str] = {}
    try:
        a, b = key_of(server, keys, "a"), key_of(server, keys, "b")

        async def burst() -> tuple[list[httpx.Response], httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as c:
                body = {"user_id": "a", "prompt": PROMPT, "max_new_tokens": 40}
                head = {"Authorization": f"Bearer {a}"}
                flood = [c.post("/generate", json=body, headers=head) for _ in range(12)]
                tasks = [asyncio.create_task(x) for x in flood]
                await asyncio.sleep(0.3)
                other = await c.post(
                    "/generate",
                    json={"user_id": "b", "prompt": PROMPT, "max_new_tokens": 4},
                    headers={"Authorization": f"Bearer {b}"},
                )
                return list(await asyncio.gather(*tasks)), other

        responses, other = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 429} and codes.count(200) >= 3, codes  # at least its share
        refused = next(r for r in responses if r.status_code == 429)
        assert "'a' already has 3 requests queued" in refused.json()["error"]["message"]
        assert refused.headers["Retry-After"]
        assert other.status_code == 200  # b was admitted while a overflowed
        with server.admin() as c:
            r = c.put("/admin/tenants/a/limits", json={"requests_per_minute": 2, "weight": 2})
            assert r.status_code == 200 and r.json()["effective"]["requests_per_minute"] == 2
        with server.client(a) as c:
            first, second, third = (generate(c, "a") for _ in range(3))
        assert [first.status_code, second.status_code, third.status_code] == [200, 200, 429]
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert second.headers["x-ratelimit-remaining-requests"] == "0"
        assert third.json()["error"]["type"] == "rate_limit_exceeded"
        assert "2 requests per minute" in third.json()["error"]["message"]
        assert 1 <= int(third.headers["Retry-After"]) <= 60
        assert third.headers["x-ratelimit-reset-requests"]
        with server.client(b) as c:
            fine = generate(c, "b")
            assert fine.status_code == 200 and "x-ratelimit-limit-requests" not in fine.headers
            assert c.put("/admin/tenants/b/limits", json={"weight": 9}).status_code == 403
        with server.admin() as c:
            view = {t["user_id"]: t for t in c.get("/admin/tenants").json()["tenants"]}
            assert view["a"]["overridden"] and view["a"]["limits"]["weight"] == 2
            assert view["b"]["last_hour"]["requests"] >= 2
    finally:
        server.stop()


def test_rate_limits_hold_across_two_replicas(tmp_path: Path, tiny, postgres) -> None:
    dsn = postgres.new_database()
    one = serve(tmp_path / "one", tiny, store=dsn)
    (tmp_path / "two").mkdir()
    two = start_server(
        tmp_path / "two", "--model", str(tiny[0]), "--r", str(R), "--max-seq-len", "256", store=dsn
    )
    try:
        key = one.new_user("a")
        with one.admin() as c:
            assert c.put("/admin/tenants/a/limits", json={"requests_per_minute": 5}).is_success
        with two.admin() as c:  # the other replica reads overrides again within seconds
            deadline = time.time() + 20
            while c.get("/admin/tenants/a/limits").json()["effective"]["requests_per_minute"] != 5:
                assert time.time() < deadline
                time.sleep(0.5)
        codes = []
        for i in range(10):
            with (one if i % 2 else two).client(key) as c:
                codes.append(generate(c, "a", 2).status_code)
        assert codes.count(200) == 5 and codes.count(429) == 5, codes  # 5 in all, not 5 each
    finally:
        two.stop()
        one.stop()


# -- usage ----------------------------------------------------------------------------------
def test_usage_adds_up_to_what_clients_counted_and_survives_a_restart(tmp_path: Path, tiny) -> None:
    store = str(tmp_path / "store")
    server = serve(tmp_path / "first", tiny, store=store)
    keys: dict[str, str] = {}
    start = int(time.time()) - 1
    try:
        a, b = key_of(server, keys, "a"), key_of(server, keys, "b")
        counted = {"requests": 0, "input": 0, "output": 0}
        with server.client(a) as c:
            for n in (5, 7):
                usage = generate(c, "a", n).json()["usage"]
                counted["requests"] += 1
                counted["input"] += usage["prompt_tokens"]
                counted["output"] += usage["completion_tokens"]
            prompt_tokens = usage["prompt_tokens"]
            tokens, done = 0, None
            body = {"user_id": "a", "prompt": PROMPT, "max_new_tokens": 9, "stream": True}
            with c.stream("POST", "/generate", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        event = json.loads(line[6:])
                        tokens += event["type"] == "token"
                        done = event if event["type"] == "done" else done
            assert done["usage"]["completion_tokens"] == tokens == 9
            counted["requests"] += 1
            counted["input"] += done["usage"]["prompt_tokens"]
            counted["output"] += tokens
            chat = c.post(
                "/v1/chat/completions",
                json={
                    "model": "a",
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 6,
                },
            ).json()["usage"]
            counted["requests"] += 1
            counted["input"] += chat["prompt_tokens"]
            counted["output"] += chat["completion_tokens"]
            received = 0
            body = {"user_id": "a", "prompt": PROMPT, "max_new_tokens": 200, "stream": True}
            with c.stream("POST", "/generate", json=body) as r:  # hangs up after 3 tokens
                for line in r.iter_lines():
                    received += line.startswith('data: {"type": "token"')
                    if received == 3:
                        break
            too_long = generate(c, "a", 300)  # refused before the engine: not a request served
            assert too_long.status_code == 400
        with server.client(b) as c:
            generate(c, "b", 3)
        time.sleep(1.0)  # the hung-up request is cancelled and counted

        def totals(srv: LiveServer, token: str, **params) -> dict:
            with srv.client(token) as c:
                r = c.get(
                    "/v1/organization/usage/completions",
                    params={"start_time": start, "bucket_width": "1h", **params},
                )
                assert r.status_code == 200, r.text
            rows = [x for bucket in r.json()["data"] for x in bucket["results"]]
            return {
                "requests": sum(x["num_model_requests"] for x in rows),
                "input": sum(x["input_tokens"] for x in rows),
                "output": sum(x["output_tokens"] for x in rows),
            }

        mine = totals(server, a)
        assert mine["requests"] == counted["requests"] + 1  # and the cancelled one
        assert mine["input"] == counted["input"] + prompt_tokens
        cancelled_output = mine["output"] - counted["output"]
        assert received <= cancelled_output < 200  # generated before the hang-up was seen
        with server.client(a) as c:
            theirs = c.get(
                "/v1/organization/usage/completions",
                params={"start_time": start, "user_ids": "b"},
            )
            assert theirs.status_code == 403
        everyone = totals(server, ADMIN, group_by="user_id")
        assert everyone["requests"] == mine["requests"] + 1  # b's
        with server.client(a) as c:  # counted in memory only when the server stops
            last = generate(c, "a", 4).json()["usage"]
    finally:
        server.stop()  # SIGTERM: a clean stop flushes the last counts
    (tmp_path / "second").mkdir()
    again = start_server(
        tmp_path / "second", "--model", str(tiny[0]), "--r", str(R), "--max-seq-len", "256",
        store=store,
    )  # fmt: skip
    try:
        assert totals(again, a) == {  # durable across the restart, the last request included
            "requests": mine["requests"] + 1,
            "input": mine["input"] + last["prompt_tokens"],
            "output": mine["output"] + last["completion_tokens"],
        }
    finally:
        again.stop()

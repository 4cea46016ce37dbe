"""Load and soak on loopback: 200 concurrent clients, 5,000+ requests across 500 users, with
uploads and deletes interleaved. Every request ends in a completion or a 4xx/429 (none lost,
none hung), every acknowledged upload or delete is what the store holds afterwards, the stats
return to idle, and RSS is flat after warm-up."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from kit import ADMIN_TOKEN, OCTET, start_tiny, stored_bytes, tiny_adapter, wait_idle
from live import LiveServer

CLIENTS, USERS, ROUNDS, PER_ROUND = 200, 500, 5, 1000  # 5,000 requests + 500 key creations
TIME_BOUND_S = 300.0
# RSS after each round, once the server has given its freed heap back (server/heap.py): malloc
# held 60-150 MiB of free memory in its arenas, varying by tens of MiB from round to round
# (measured in-use heap flat at 219 MiB while RSS read [678, 677, 690, 714, 698, 680, 718]);
# trimmed, RSS read [612, 612, 589, 590, 590, 590] and [582, 597, 601, 586, 601]. Caches and
# arenas fill over the first rounds, a leak keeps growing: the last two rounds' lower reading
# is under PLATEAU_SLACK above the first two's (two rounds of a leak apart; one reading off by
# some MiB does not decide), and the whole run grows by under RSS_SLACK.
RSS_SLACK = 128 * 1024 * 1024
PLATEAU_SLACK = 32 * 1024 * 1024
SETTLE_S = 3.0  # the releaser looks every second (heap.CHECK_S)


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory, tiny_dir: Path) -> Iterator[LiveServer]:
    server = start_tiny(
        tmp_path_factory.mktemp("soak"),
        tiny_dir,
        *("--max-batch", "32", "--max-waiting", "64", "--device-slots", "48"),
        *("--host-slots", "128", "--max-seq-len", "64"),
        admin_token=ADMIN_TOKEN,
    )
    yield server
    server.stop()


class Soak:
    """Each user belongs to one client, so a user's own requests are sequential and its final
    state (last acked version, or deleted) is known exactly."""

    def __init__(self, server: LiveServer, keys: dict[str, str], bodies: list[bytes]) -> None:
        self.server, self.keys, self.bodies = server, keys, bodies
        self.version: dict[str, int | None] = dict.fromkeys(keys)  # None = no adapter
        self.statuses: Counter[str] = Counter()
        self.sent = 0

    async def one(self, http: httpx.AsyncClient, uid: str, rng: random.Random) -> None:
        auth = {"Authorization": f"Bearer {self.keys[uid]}"}
        roll = rng.random()
        if roll < 0.15 or self.version[uid] is None and roll < 0.4:
            r = await http.put(
                f"/users/{uid}/adapter", content=rng.choice(self.bodies), headers={**auth, **OCTET}
            )
            if r.status_code == 201:
                self.version[uid] = r.json()["version"]
            kind = "upload"
        elif roll < 0.20:
            r = await http.delete(f"/users/{uid}/adapter", headers=auth)
            if r.status_code == 204:
                self.version[uid] = None
            kind = "delete"
        elif roll < 0.60:
            r = await http.get(f"/users/{uid}/adapter", headers=auth)
            kind = "get"
        elif roll < 0.70:
            r = await http.get("/v1/models", headers=auth)
            assert r.status_code != 200 or {m["id"] for m in r.json()["data"][1:]} <= {uid}
            kind = "models"
        elif roll < 0.73:
            body = {"model": uid, "prompt": "hello", "max_tokens": rng.randint(1, 4)}
            r = await http.post("/v1/completions", json=body, headers=auth)
            kind = "openai"
        elif roll < 0.76:
            body = {"user_id": uid, "prompt": "hi", "max_new_tokens": 4, "stream": True}
            async with http.stream("POST", "/generate", json=body, headers=auth) as r:
                text = "".join([line async for line in r.aiter_lines()])
                assert r.status_code != 200 or '"type": "done"' in text, text[-300:]
            kind = "stream"
        else:
            body = {"user_id": uid, "prompt": "hi there", "max_new_tokens": rng.randint(1, 4)}
            r = await http.post("/generate", json=body, headers=auth)
            kind = "generate"
        self.sent += 1
        self.statuses[f"{kind} {r.status_code}"] += 1
        ok = r.status_code in (200, 201, 204) or 400 <= r.status_code < 500
        assert ok, (kind, r.status_code, r.text[:300])

    async def client(self, http: httpx.AsyncClient, users: list[str], n: int, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(n):
            await self.one(http, rng.choice(users), rng)

    async def round(self, total: int, seed: int) -> None:
        users = sorted(self.keys)
        owned = [users[i::CLIENTS] for i in range(CLIENTS)]  # each user owned by one client
        # keep-alive shorter than the server's (uvicorn: 5 s), so the client never reuses a
        # connection the server is closing at that instant (the classic keep-alive race)
        limits = httpx.Limits(
            max_connections=CLIENTS, max_keepalive_connections=CLIENTS, keepalive_expiry=1.0
        )
        async with httpx.AsyncClient(base_url=self.server.url, timeout=60.0, limits=limits) as http:
            per = [total // CLIENTS + (i < total % CLIENTS) for i in range(CLIENTS)]
            await asyncio.gather(
                *(self.client(http, owned[i], per[i], seed * 1000 + i) for i in range(CLIENTS))
            )


def _settled_rss(server: LiveServer) -> int:
    """RSS once the idle server has trimmed its heap (or had nothing worth trimming)."""
    with server.admin() as c:
        trims = c.get("/admin/stats").json()["heap"]["trims"]
        deadline = time.time() + SETTLE_S
        while time.time() < deadline and c.get("/admin/stats").json()["heap"]["trims"] == trims:
            time.sleep(0.2)
    return _rss(server)


def _rss(server: LiveServer) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


@pytest.mark.slow
def test_soak_many_users_uploads_and_deletes(soak_server: LiveServer, tvm) -> None:
    t0 = time.time()
    keys = {f"soak-{i:03d}": soak_server.new_user(f"soak-{i:03d}") for i in range(USERS)}
    bodies = [stored_bytes(tiny_adapter(tvm, 500 + s), tvm) for s in range(8)]
    soak = Soak(soak_server, keys, bodies)
    rss = []
    for i in range(ROUNDS):  # round 0 is the warm-up
        remaining = TIME_BOUND_S - (time.time() - t0)
        asyncio.run(asyncio.wait_for(soak.round(PER_ROUND, i), timeout=remaining))
        wait_idle(soak_server, ADMIN_TOKEN)
        rss.append(_settled_rss(soak_server))
    elapsed = time.time() - t0
    stats = wait_idle(soak_server, ADMIN_TOKEN)
    eng, ad = stats["engine"], stats["adapters"]
    print(
        f"soak: {soak.sent} requests by {CLIENTS} concurrent clients over {USERS} users in "
        f"{elapsed:.0f} s; statuses {dict(sorted(soak.statuses.items()))}; RSS MiB "
        f"{[r >> 20 for r in rss]}; heap {stats['heap']}; finish reasons {eng['finish_reasons']}"
    )
    assert soak.sent == ROUNDS * PER_ROUND >= 5000
    assert eng["running_batch"] == 0 and eng["queue_depth"] == 0 and eng["kv_cache_bytes"] == 0
    assert ad["slots_pinned"] == 0
    heap = stats["heap"]
    assert heap["trims"] > 0 and heap["released_bytes"] > 0, heap  # glibc: the CI's libc
    assert eng["finish_reasons"].get("error", 0) == 0, eng
    assert sum(v for k, v in soak.statuses.items() if k.startswith("upload 201")) > 100
    assert soak.statuses["delete 204"] > 20
    assert max(rss[1:]) - rss[1] < RSS_SLACK, [r >> 20 for r in rss]
    assert min(rss[-2:]) - min(rss[1:3]) < PLATEAU_SLACK, [r >> 20 for r in rss]
    _assert_store_matches(soak_server, soak)


def _assert_store_matches(server: LiveServer, soak: Soak) -> None:
    """No acknowledged upload or delete was lost: the store holds exactly what was acked."""
    with server.admin() as c:
        stored = {m["id"] for m in c.get("/v1/models").json()["data"][1:]}
        for uid, version in soak.version.items():
            if version is None:
                assert uid not in stored
                continue
            assert c.get(f"/users/{uid}/adapter").json()["version"] == version, uid
    assert stored == {u for u, v in soak.version.items() if v is not None}

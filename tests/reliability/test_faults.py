"""Fault injection: SIGKILL the server at random points while users upload and generate.

After every restart each adapter is exactly one version a client sent (the last acknowledged
one, or the one in flight when the process died), byte-for-byte what the server reports, no
temp file is left, and the server serves. A client that walks away mid-stream frees its KV.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from kit import OCTET, sha256, start_tiny, stored_bytes, temp_files, tiny_adapter, wait_idle
from live import LiveServer
from safetensors.torch import load as st_load

USERS = [f"crash-{i}" for i in range(8)]
VERSIONS = 3  # each user cycles through 3 distinct adapters, so a wrong one is detectable
KILL_CYCLES = 8


def _content_id(data: bytes, table: dict[str, bytes]) -> str | None:
    """Which of the user's known adapters ``data`` holds (by tensors, not header order)."""
    got = st_load(data)
    for cid, ref in table.items():
        want = st_load(ref)
        if set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want):
            return cid
    return None


class Workload:
    """Uploads (each user cycling through its versions) and streamed generations until stopped."""

    def __init__(self, server: LiveServer, bodies: dict[str, list[bytes]], start: dict[str, int]):
        self.server, self.bodies = server, bodies
        self.acked = dict(start)  # user -> index of the last version the server acknowledged
        self.in_flight: dict[str, int | None] = dict.fromkeys(bodies)
        self.uploads = self.generations = 0
        self.stop = threading.Event()

    def upload_loop(self, uid: str) -> None:
        i = self.acked[uid]
        with self.server.client(timeout=30) as c:
            while not self.stop.is_set():
                i = (i + 1) % VERSIONS
                self.in_flight[uid] = i
                try:
                    r = c.put(f"/users/{uid}/adapter", content=self.bodies[uid][i], headers=OCTET)
                except httpx.HTTPError:
                    return  # killed mid-request: in_flight stays set
                assert r.status_code == 201, r.text
                self.acked[uid], self.in_flight[uid] = i, None
                self.uploads += 1

    def generate_loop(self, uid: str) -> None:
        body = {"user_id": uid, "prompt": "tell me", "max_new_tokens": 16, "stream": True}
        with self.server.client(timeout=30) as c:
            while not self.stop.is_set():
                try:
                    with c.stream("POST", "/generate", json=body) as r:
                        assert r.status_code == 200
                        for _ in r.iter_lines():
                            pass
                except httpx.HTTPError:
                    return
                self.generations += 1


def _check_store(server: LiveServer, bodies, acked, in_flight) -> int:
    """Every user's adapter is its last acked or its in-flight version; returns users checked."""
    assert not temp_files(server.store), temp_files(server.store)
    with server.client(timeout=30) as c:
        for uid, versions in bodies.items():
            meta = c.get(f"/users/{uid}/adapter").json()
            data = (
                server.store / "adapters" / uid / f"v{meta['version']}.safetensors"
            ).read_bytes()
            assert sha256(data) == meta["sha256"] and len(data) == meta["bytes"]
            table = {str(i): b for i, b in enumerate(versions)}
            got = _content_id(data, table)
            allowed = {str(acked[uid])} | (
                {str(in_flight[uid])} if in_flight[uid] is not None else set()
            )
            assert got in allowed, (uid, got, allowed)
        r = c.post("/generate", json={"user_id": USERS[0], "prompt": "hi", "max_new_tokens": 4})
        assert r.status_code == 200, r.text
    return len(bodies)


@pytest.mark.slow
def test_sigkill_during_uploads_and_generation(tmp_path: Path, tiny_dir: Path, tvm) -> None:
    rng = random.Random(7)
    bodies = {
        uid: [stored_bytes(tiny_adapter(tvm, 100 * u + v), tvm) for v in range(VERSIONS)]
        for u, uid in enumerate(USERS)
    }
    store = tmp_path / "store"
    server = start_tiny(tmp_path, tiny_dir, admin_token=None, store=store)
    with server.client() as c:
        for uid in USERS:
            assert (
                c.put(f"/users/{uid}/adapter", content=bodies[uid][0], headers=OCTET).status_code
                == 201
            )
    acked, in_flight = dict.fromkeys(USERS, 0), dict.fromkeys(USERS, None)
    kills = uploads = generations = 0
    t_end = time.time() + 240  # hard bound on the whole test
    for _ in range(KILL_CYCLES):
        work = Workload(server, bodies, acked)
        threads = [threading.Thread(target=work.upload_loop, args=(u,)) for u in USERS]
        threads += [threading.Thread(target=work.generate_loop, args=(u,)) for u in USERS[:4]]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.05, 1.5))  # a random point in the middle of the traffic
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
        kills += 1
        work.stop.set()
        for t in threads:
            t.join(30)
            assert not t.is_alive()
        acked, in_flight = work.acked, work.in_flight
        uploads, generations = uploads + work.uploads, generations + work.generations
        server = start_tiny(tmp_path, tiny_dir, admin_token=None, store=store)
        _check_store(server, bodies, acked, in_flight)
        # from here on the stored version is the baseline for the next cycle
        acked = {uid: _stored_index(server, uid, bodies) for uid in USERS}
        in_flight = dict.fromkeys(USERS, None)
        assert time.time() < t_end, "fault test ran past its time bound"
    server.stop()
    print(f"faults: {kills} SIGKILLs, {uploads} acked uploads, {generations} streams completed")
    assert kills == KILL_CYCLES and uploads > 0


def _stored_index(server: LiveServer, uid: str, bodies) -> int:
    with server.client() as c:
        meta = c.get(f"/users/{uid}/adapter").json()
    data = (server.store / "adapters" / uid / f"v{meta['version']}.safetensors").read_bytes()
    return int(_content_id(data, {str(i): b for i, b in enumerate(bodies[uid])}))


def test_client_disconnect_mid_stream_frees_kv(tmp_path: Path, tiny_dir: Path, tvm) -> None:
    server = start_tiny(tmp_path, tiny_dir, admin_token=None)
    try:
        with server.client() as c:
            body = stored_bytes(tiny_adapter(tvm, 5), tvm)
            assert c.put("/users/leaver/adapter", content=body, headers=OCTET).status_code == 201
            for _ in range(5):
                req = {"user_id": "leaver", "prompt": "go", "max_new_tokens": 200, "stream": True}
                with c.stream("POST", "/generate", json=req) as r:
                    lines = r.iter_lines()
                    for _ in range(3):
                        next(lines)
                # the response is closed here, long before 200 tokens
        stats = wait_idle(server, None)
        eng = stats["engine"]
        assert eng["running_batch"] == 0 and eng["queue_depth"] == 0, eng
        assert eng["kv_cache_bytes"] == 0 and stats["adapters"]["slots_pinned"] == 0, stats
        assert eng["finish_reasons"].get("cancelled", 0) == 5, eng
    finally:
        server.stop()

"""Two ``vera-serve serve`` processes on one PostgreSQL store: one source of truth.

What an application sees when its requests land on any replica: keys work everywhere, an
acknowledged upload or delete is what the very next request anywhere gets (PEFT-exact tokens of
the new version), and a database outage stops writes (503) but not serving.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live import (
    LiveServer,
    adapter_bytes,
    build_tiny_model,
    merged_greedy,
    random_adapter,
    start_server,
)

from server.model_source import load_model
from vera_core import Adapter, VeraConfig, VeraModel, inject_vera

R = 16
OCTET = {"Content-Type": "application/octet-stream"}
PROMPT = "Tell me something"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-shared"))


@pytest.fixture(scope="module")
def tvm(tiny_dir: Path) -> VeraModel:
    model, tok, _ = load_model(str(tiny_dir))
    vm = inject_vera(model, VeraConfig(r=R), num_slots=2)
    vm.prompt_ids = list(tok(PROMPT, add_special_tokens=True)["input_ids"])  # type: ignore[attr-defined]
    return vm


@pytest.fixture(scope="module")
def pair(postgres, tiny_dir: Path, tmp_path_factory) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Replicas A and B of the tiny model on one fresh database."""
    dsn = postgres.new_database()
    args = ("--model", str(tiny_dir), "--r", str(R), "--max-seq-len", "256")
    a = start_server(tmp_path_factory.mktemp("replica-a"), *args, store=dsn)
    b = start_server(tmp_path_factory.mktemp("replica-b"), *args, store=dsn)
    yield a, b
    for server in (a, b):
        server.stop()


class References:
    """Greedy tokens of the merged model per adapter (the exact answer a replica must give)."""

    def __init__(self, vm: VeraModel) -> None:
        self.vm, self._cache = vm, {}
        self._lock = threading.Lock()

    def adapter(self, seed: int) -> Adapter:
        return random_adapter(self.vm, seed)

    def tokens(self, seed: int) -> list[int]:
        with self._lock:
            if seed not in self._cache:
                ids = self.vm.prompt_ids  # type: ignore[attr-defined]
                self._cache[seed] = merged_greedy(self.vm, self.adapter(seed), ids, NEW_TOKENS)
            return self._cache[seed]


@pytest.fixture(scope="module")
def refs(tvm: VeraModel) -> References:
    return References(tvm)


def generate(server: LiveServer, key: str, user: str) -> httpx.Response:
    with server.client(key, timeout=60) as c:
        body = {"user_id": user, "prompt": PROMPT, "max_new_tokens": NEW_TOKENS}
        return c.post("/generate", json=body)


def token_ids(server: LiveServer, key: str, user: str) -> tuple[int, list[int]]:
    """(adapter_version, token ids) of one streamed greedy generation."""
    with server.client(key, timeout=60) as c:
        body = {"user_id": user, "prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "stream": True}
        ids, version = [], None
        with c.stream("POST", "/generate", json=body) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                ev = json.loads(line[6:])
                if ev["type"] == "token":
                    ids.append(ev["token_id"])
                else:
                    assert ev["finish_reason"] in ("stop", "length"), ev
                    version = ev["adapter_version"]
    assert version is not None
    return version, ids


def upload(server: LiveServer, key: str, user: str, adapter: Adapter) -> httpx.Response:
    with server.client(key, timeout=60) as c:
        return c.put(f"/users/{user}/adapter", content=adapter_bytes(adapter), headers=OCTET)


def test_key_made_on_one_replica_works_on_the_other(pair) -> None:
    a, b = pair
    key = a.new_user("kim")
    with b.client(key) as c:
        assert c.get("/users/kim/adapter").status_code == 404  # authenticated, no adapter yet
        assert c.get("/users/someone-else/adapter").status_code == 403
    with b.client("vk-not-a-key") as c:
        assert c.get("/users/kim/adapter").status_code == 401


def test_upload_through_a_is_served_by_b_at_once(pair, refs: References) -> None:
    a, b = pair
    key = a.new_user("lee")
    assert refs.tokens(101) != refs.tokens(102), "the two versions must be told apart"
    for version, seed in enumerate((101, 102, 101), start=1):
        r = upload(a, key, "lee", refs.adapter(seed))
        assert r.status_code == 201 and r.json()["version"] == version, r.text
        assert token_ids(b, key, "lee") == (version, refs.tokens(seed))  # no wait in between


def test_delete_through_b_is_a_404_through_a_at_once(pair, refs: References) -> None:
    a, b = pair
    key = a.new_user("max")
    assert upload(a, key, "max", refs.adapter(7)).status_code == 201
    assert token_ids(a, key, "max") == (1, refs.tokens(7))  # A holds it on a slot now
    with b.client(key) as c:
        assert c.delete("/users/max/adapter").status_code == 204
    r = generate(a, key, "max")
    assert r.status_code == 404 and "no adapter" in r.json()["error"]["message"], r.text
    with a.client(key) as c:
        assert c.get("/users/max/adapter").status_code == 404


def test_eight_users_uploading_and_generating_across_both(pair, refs: References) -> None:
    """Each user uploads through a random replica, then reads through the other at once."""
    a, b = pair
    users = [f"crowd{i}" for i in range(8)]
    keys = {u: a.new_user(u) for u in users}
    failures: list[str] = []

    def run(i: int, user: str) -> None:
        rng = random.Random(i)
        for step in range(4):
            seed = 1000 + 10 * i + rng.randrange(3)
            writer, reader = (a, b) if rng.random() < 0.5 else (b, a)
            r = upload(writer, keys[user], user, refs.adapter(seed))
            if r.status_code != 201:
                failures.append(f"{user} upload {step}: {r.status_code} {r.text}")
                return
            got = token_ids(reader, keys[user], user)
            want = (r.json()["version"], refs.tokens(seed))
            if got != want:
                failures.append(f"{user} step {step}: got {got}, acknowledged {want}")

    for i in range(8):  # references first: the threads then only talk to the servers
        for s in range(3):
            refs.tokens(1000 + 10 * i + s)
    threads = [threading.Thread(target=run, args=(i, u)) for i, u in enumerate(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures, "\n".join(failures)


def test_fine_tuning_jobs_are_shared_by_the_replicas(pair) -> None:
    """A file uploaded to A trains in a job created on B; whichever replica runs it, both see
    its progress, a cancel sent to the other replica stops it, and the result is served by
    both at once."""
    a, b = pair
    key = a.new_user("ned")
    rows = [{"prompt": f"Item {i}:", "completion": f" value {i}"} for i in range(12)]
    content = "\n".join(json.dumps(r) for r in rows).encode()
    with a.client(key) as ca, b.client(key) as cb:
        files = {"file": ("ned.jsonl", content, "application/octet-stream")}
        file_id = ca.post("/v1/files", files=files, data={"purpose": "fine-tune"}).json()["id"]
        assert cb.get(f"/v1/files/{file_id}").json()["bytes"] == len(content)
        long = {"n_epochs": 50, "batch_size": 1}  # 600 steps: still running when cancelled
        body = {"model": "tiny", "training_file": file_id, "hyperparameters": long}
        r = cb.post("/v1/fine_tuning/jobs", json=body)
        assert r.status_code == 400 and "use the base model" in r.json()["error"]["message"]
        body["model"] = cb.get("/v1/models").json()["data"][0]["id"]
        job_id = cb.post("/v1/fine_tuning/jobs", json=body).json()["id"]

        def stepped(c: httpx.Client) -> bool:
            events = c.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
            return any(e["type"] == "metrics" for e in events)

        wait(lambda: stepped(ca) and stepped(cb))
        for c in (ca, cb):  # cancel through both: whichever does not run it, too
            assert c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
        wait(lambda: ca.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "cancelled")
        body["hyperparameters"] = {"n_epochs": 2}
        job_id = ca.post("/v1/fine_tuning/jobs", json=body).json()["id"]
        wait(lambda: cb.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "succeeded")
        version = cb.get(f"/v1/fine_tuning/jobs/{job_id}").json()["adapter_version"]
        assert version == 1
        for server in (a, b):
            assert token_ids(server, key, "ned")[0] == version


def wait(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_postgres_outage_keeps_serving_and_refuses_writes(pair, postgres, refs) -> None:
    a, b = pair
    key = a.new_user("ola")
    assert upload(a, key, "ola", refs.adapter(31)).status_code == 201
    for server in (a, b):  # both replicas hold the adapter and know the key
        assert token_ids(server, key, "ola") == (1, refs.tokens(31))
    postgres.kill()
    try:
        for server in (a, b):
            assert token_ids(server, key, "ola") == (1, refs.tokens(31))
            start = time.monotonic()
            r = upload(server, key, "ola", refs.adapter(32))
            assert r.status_code == 503, r.text
            assert "unreachable" in r.json()["error"]["message"]
            assert time.monotonic() - start < 15
            with server.admin() as c:
                stats = c.get("/admin/stats")
                assert stats.status_code == 200 and stats.json()["store"]["reachable"] is False
                assert c.get("/metrics").status_code == 200
    finally:
        postgres.start()
    deadline = time.monotonic() + 30
    while (r := upload(b, key, "ola", refs.adapter(32))).status_code == 503:
        assert time.monotonic() < deadline, f"no recovery after Postgres came back: {r.text}"
        time.sleep(0.5)
    assert r.status_code == 201 and r.json()["version"] == 2, r.text
    assert token_ids(a, key, "ola") == (2, refs.tokens(32))
    for server in (a, b):
        assert server.proc.poll() is None
        assert "Traceback" not in server.log_text()

"""A live server on a tiny random Llama with real traffic from several users, for the tests of
what operators watch (the console, /admin/history, /metrics through Prometheus).

``start_busy`` returns once every user has an adapter, every user has been served, and one
small fine-tuning job has finished, so each view has data; ``Load`` keeps requests flowing in
the background (more than the batch holds, so some wait) while a test looks at the server.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from live import LiveServer, adapter_bytes, build_tiny_model, random_adapter, start_server

from server.model_source import load_model
from vera_core import VeraConfig, inject_vera

USERS = ("alice", "bruno", "chen")
TRAINED = "bruno"  # whose adapter the fine-tuning job trains
R = 16
OCTET = {"Content-Type": "application/octet-stream"}


@dataclass
class BusyServer:
    live: LiveServer
    keys: dict[str, str]  # user -> API key
    job_id: str

    def generate(self, user: str, max_new_tokens: int = 24) -> httpx.Response:
        body = {"user_id": user, "prompt": f"{user} says hello and", "temperature": 0.8, "seed": 1}
        with self.live.client(self.keys[user], timeout=60) as c:
            return c.post("/generate", json={**body, "max_new_tokens": max_new_tokens})


@dataclass
class Load:
    """Background requests from every user (``per_user`` at a time) until ``stop``."""

    server: BusyServer
    per_user: int = 2
    max_new_tokens: int = 48
    served: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for user in USERS:
            for _ in range(self.per_user):
                thread = threading.Thread(target=self._loop, args=(user,), daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _loop(self, user: str) -> None:
        while not self._stop.is_set():
            try:
                if self.server.generate(user, self.max_new_tokens).status_code == 200:
                    self.served += 1
            except httpx.HTTPError:
                time.sleep(0.2)


def training_jsonl(examples: int = 4) -> bytes:
    rows = [
        {"prompt": f"Favourite number {i}:", "completion": f" {i * 7} is the one I like."}
        for i in range(examples)
    ]
    return "\n".join(json.dumps(r) for r in rows).encode()


def start_busy(workdir: Path) -> BusyServer:
    model_dir = build_tiny_model(workdir / "tiny-model")
    live = start_server(
        workdir,
        "--model",
        str(model_dir),
        "--r",
        str(R),
        "--max-seq-len",
        "256",
        "--max-batch",
        "3",  # fewer rows than the load's requests: some wait, the scheduler shares
    )
    try:
        model, _, _ = load_model(str(model_dir))
        vm = inject_vera(model, VeraConfig(r=R), num_slots=2)
        keys = {user: live.new_user(user) for user in USERS}
        for seed, user in enumerate(USERS):
            with live.client(keys[user]) as c:
                body = adapter_bytes(random_adapter(vm, seed))
                r = c.put(f"/users/{user}/adapter", content=body, headers=OCTET)
                assert r.status_code == 201, r.text
        busy = BusyServer(live, keys, job_id="")
        with ThreadPoolExecutor(6) as pool:  # every user served, several at once
            answers = list(pool.map(busy.generate, [u for u in USERS for _ in range(2)]))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        busy.job_id = train(live)
        return busy
    except BaseException:
        live.stop()
        raise


def train(live: LiveServer, timeout: float = 120) -> str:
    """A small fine-tuning job on ``TRAINED``'s adapter, run to the end; its id."""
    params = {"n_epochs": 3, "batch_size": 1}
    with live.admin() as c:
        r = c.post(f"/users/{TRAINED}/adapter/train", params=params, content=training_jsonl())
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            if job["status"] == "succeeded":
                return job_id
            assert job["status"] in ("validating_files", "queued", "running"), job
            time.sleep(0.3)
    raise AssertionError(f"fine-tuning job {job_id} did not finish in {timeout} s")

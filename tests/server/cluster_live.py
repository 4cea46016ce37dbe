"""Start a real ``vera-serve cluster`` (local Ray) on a free port for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from live import ADMIN, LiveServer, free_port


def start_cluster(
    workdir: Path, store: str, *args: str, replicas: int = 2, timeout: float = 240
) -> LiveServer:
    """Launch the CLI in its own session (so every Ray process it starts can be reaped) and
    wait until ``/health`` reports all ``replicas``."""
    port = free_port()
    log = workdir / f"cluster-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VERA_ADMIN_TOKEN": ADMIN, "RAY_DEDUP_LOGS": "0"}
    cmd = [sys.executable, "-m", "server.cli", "cluster", "--port", str(port), "--store", store]
    cmd += ["--replicas", str(replicas), "--replica-cpus", "0", *args]
    proc = subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    live = LiveServer(f"http://127.0.0.1:{port}", proc, Path(store), log, ADMIN)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cluster exited {proc.returncode}:\n{live.log_text()[-4000:]}")
        if healthy_replicas(live) == replicas:
            return live
        time.sleep(0.5)
    stop_cluster(live)
    raise RuntimeError(f"cluster did not come up:\n{live.log_text()[-4000:]}")


def healthy_replicas(live: LiveServer) -> int:
    try:
        r = httpx.get(f"{live.url}/health", timeout=5)
    except httpx.HTTPError:
        return 0
    return r.json().get("replicas", 0) if r.status_code == 200 else 0


def stop_cluster(live: LiveServer, timeout: float = 120) -> int:
    """SIGTERM (drain), then make sure nothing of its session is left running."""
    code = live.stop(signal.SIGTERM, timeout)
    deadline = time.time() + 15  # Ray's own processes exit shortly after the driver
    while (leftovers := session_processes(live.proc.pid)) and time.time() < deadline:
        time.sleep(0.5)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left behind: {leftovers}"
    return code


def session_processes(sid: int) -> list[int]:
    """Live pids whose session id is ``sid`` (every process the CLI started)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields[3]: session, [0]: state
            out.append(int(entry.name))
    return out


async def sse_events(c: httpx.AsyncClient, path: str, body: dict) -> list[dict | str]:
    """The ``data:`` events of ``body`` streamed to ``path`` (JSON decoded, ``[DONE]`` kept)."""
    out: list[dict | str] = []
    async with c.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def per_replica(live: LiveServer, key: str = "requests_submitted") -> dict[str, int]:
    """An engine counter per replica id, once the replicas have reported what just ran."""
    time.sleep(2.5)  # replicas report every second
    with live.admin() as c:
        stats = c.get("/admin/stats").json()
    return {r["replica"]: r["engine"][key] for r in stats["replicas"]}


def busiest_replica_pid(live: LiveServer, running: int) -> int:
    """Once ``running`` sequences decode across the replicas, the pid of the busiest one."""
    deadline = time.time() + 30
    while time.time() < deadline:
        with live.admin() as c:
            replicas = c.get("/admin/stats").json()["replicas"]
        if sum(r["engine"]["running_batch"] for r in replicas) >= running:
            return max(replicas, key=lambda r: r["engine"]["running_batch"])["pid"]
        time.sleep(0.2)
    raise AssertionError(f"requests not running: {replicas}")

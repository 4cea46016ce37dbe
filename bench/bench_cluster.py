"""Cluster overhead: `vera-serve cluster --replicas 1` vs plain `vera-serve serve`, same run.

N concurrent streaming clients (/generate, each a different user with its own adapter) on the
real default model, through each server in turn, on the same machine and store kind (a local
directory), the replica given every CPU (as `serve` has). Reports per server: tokens/s and
TTFT p50 (median over rounds), RSS of the engine process(es) and of everything else the
server started (Ray's controller, proxy, gateway, stats board). Target: cluster >= 0.85x.
One machine cannot show scaling: this measures what the Ray Serve hops cost.

    .venv/bin/python bench/bench_cluster.py [--clients 16] [--new-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from bench_server import TOPICS, make_adapter, pct, run_clients

from server.model_source import load_model
from vera_core import VeraConfig, inject_vera
from vera_core.adapter_file import adapter_to_bytes

MIB = 1024 * 1024
# (name, subcommand, extra env): `cluster` as launched (Ray Serve's throughput-optimized mode,
# see server/cluster/launcher.py), and with Ray Serve's defaults (a proxy actor in front).
VARIANTS = [
    ("serve", "serve", {}),
    ("cluster", "cluster", {}),
    ("cluster, Ray Serve defaults", "cluster", {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}),
]
OCTETS = {"Content-Type": "application/octet-stream"}


def launch(kind: str, env: dict, store: Path, port: int, clients: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server.cli", kind, "--port", str(port), "--store", str(store)]
    cmd += ["--max-batch", str(clients), "--device-slots", str(clients + 8)]
    cmd += ["--log-level", "warning"]
    if kind == "cluster":
        cmd += ["--replicas", "1", "--replica-cpus", str(os.cpu_count())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    env.pop("VERA_ADMIN_TOKEN", None)  # dev mode on loopback, as bench_server
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited with {proc.returncode}")
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{kind} did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def memory(proc: subprocess.Popen, url: str) -> tuple[list[float], float]:
    """(RSS MiB of each engine process, RSS MiB of every other process of its session)."""
    replicas = httpx.get(f"{url}/admin/stats", timeout=30).json().get("replicas")
    engines = {r["pid"] for r in replicas} if replicas else {proc.pid}
    others = 0.0
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == proc.pid and p.pid not in engines:
                others += p.memory_info().rss / MIB
        except (psutil.Error, ProcessLookupError):
            continue
    return [psutil.Process(p).memory_info().rss / MIB for p in sorted(engines)], others


def measure(kind: str, env: dict, store: Path, port: int, vm, args: argparse.Namespace) -> dict:
    """One launch: upload the users' adapters, warm up, then ``args.rounds`` timed rounds."""
    users = [f"user{i:03d}" for i in range(args.clients)]
    prompts = [f"Write two sentences about {TOPICS[i % len(TOPICS)]}." for i in range(len(users))]
    url = f"http://127.0.0.1:{port}"
    proc = launch(kind, env, store, port, args.clients)
    try:
        for i, user in enumerate(users):
            data = adapter_to_bytes(make_adapter(vm, i))
            r = httpx.put(f"{url}/users/{user}/adapter", content=data, headers=OCTETS)
            r.raise_for_status()
        asyncio.run(run_clients(url, users, prompts, 4))  # warm-up
        rounds = [
            asyncio.run(run_clients(url, users, prompts, args.new_tokens))
            for _ in range(args.rounds)
        ]
        engines, others = memory(proc, url)
    finally:
        stop(proc)
    return {
        "tps": [r["tokens"] / r["wall"] for r in rounds],
        "ttft": [pct(r["ttft"], 50) for r in rounds],
        "engines": engines,
        "others": others,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per launch")
    ap.add_argument("--repeats", type=int, default=2, help="launches of each server")
    ap.add_argument("--port", type=int, default=8941)
    args = ap.parse_args()
    model, _, _ = load_model()
    vm = inject_vera(model, VeraConfig(r=256), num_slots=2)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # interleaved: the machine's load drifts
            for i, (name, kind, env) in enumerate(VARIANTS):
                store = Path(tmp) / f"{i}-{repeat}"
                out = measure(kind, env, store, args.port, vm, args)
                into = results.setdefault(name, {"tps": [], "ttft": []})
                into["tps"] += out["tps"]
                into["ttft"] += out["ttft"]
                into["engines"], into["others"] = out["engines"], out["others"]
    serve = statistics.median(results["serve"]["tps"])
    print(
        f"\n{args.clients} concurrent streaming clients, each its own user, {args.new_tokens} new "
        f"tokens, greedy, default model (--dtype auto), {os.cpu_count()} CPUs; medians of "
        f"{args.repeats} launches x {args.rounds} rounds, launches interleaved\n"
    )
    print("| server | tokens/s | vs serve | TTFT p50 (ms) | engine RSS (MiB) | other RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        tps = statistics.median(r["tps"])
        engines = ", ".join(f"{m:.0f}" for m in r["engines"])
        print(
            f"| {name} | {tps:.1f} | {tps / serve:.2f}x | {statistics.median(r['ttft']):.0f} | "
            f"{engines} | {r['others']:.0f} |"
        )


if __name__ == "__main__":
    main()

"""Fair sharing between users, FIFO against fair scheduling, same run, same server build.

(a) One user floods ``--flood`` streamed requests at once; two seconds later another user (the
    victim) sends a short request every half second until the flood has drained: the victim's
    time to first token (p50 / p99 / max) against its TTFT alone, before the flood.
(b) ``k`` backlogged users (2 and 4), user i starting i seconds after the first, each sending
    ``--requests`` streamed requests at once: the tokens each received while all were
    backlogged, and Jain's fairness index of those ((sum x)^2 / (k * sum x^2); 1 = equal).
(c) The throughput of (b), fair against FIFO.

Each user runs its own adapter (random vectors), through real servers on loopback
(``python -m server``), with the per-user queue share raised so that only the scheduler differs.

    .venv/bin/python bench/bench_fairness.py [--flood 240] [--requests 96] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))

from live import LiveServer, adapter_bytes, random_adapter, start_server  # noqa: E402

from server.model_source import load_model  # noqa: E402
from vera_core import VeraConfig, inject_vera  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
OCTET = {"Content-Type": "application/octet-stream"}


async def stream(client: httpx.AsyncClient, user: str, n: int, times: list[float]) -> float | None:
    """One streamed /generate; appends each token's arrival time; returns the TTFT."""
    body = {"user_id": user, "messages": MESSAGES, "max_new_tokens": n, "stream": True}
    t0, ttft = time.perf_counter(), None
    async with client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "token":
                now = time.perf_counter()
                ttft = ttft if ttft is not None else now - t0
                times.append(now)
    return ttft


async def flood_and_victim(url: str, flood: int, n: int) -> dict[str, list[float]]:
    limits = httpx.Limits(max_connections=flood + 16)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:
        solo = [await stream(client, "victim", 8, []) for _ in range(5)]
        flood_tasks = [asyncio.create_task(stream(client, "flood", n, [])) for _ in range(flood)]
        await asyncio.sleep(2.0)
        probes = []
        while not all(t.done() for t in flood_tasks):
            probes.append(await stream(client, "victim", 8, []))
            await asyncio.sleep(0.5)
        await asyncio.gather(*flood_tasks)
    return {"solo": [t for t in solo if t], "flood": [t for t in probes if t]}


async def backlogged(url: str, users: int, requests: int, n: int) -> dict:
    limits = httpx.Limits(max_connections=users * requests + 16)
    times: dict[str, list[float]] = {f"u{i}": [] for i in range(users)}
    sent_at: dict[str, float] = {}
    done_at: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:
        before = (await client.get("/admin/stats")).json()["engine"]["preemptions"]

        async def user(i: int) -> None:
            name = f"u{i}"
            await asyncio.sleep(i * 1.0)
            sent_at[name] = time.perf_counter()
            await asyncio.gather(*(stream(client, name, n, times[name]) for _ in range(requests)))
            done_at[name] = time.perf_counter()

        t0 = time.perf_counter()
        await asyncio.gather(*(user(i) for i in range(users)))
        wall = time.perf_counter() - t0
        preempted = (await client.get("/admin/stats")).json()["engine"]["preemptions"] - before
    start = max(sent_at.values())  # the last user has sent its requests: all are backlogged
    end = min(done_at.values())  # the first user is done: no longer backlogged
    got = [sum(1 for t in ts if start <= t < end) for ts in times.values()]
    jain = sum(got) ** 2 / (len(got) * sum(x * x for x in got)) if any(got) else 0.0
    total = sum(len(ts) for ts in times.values())
    return {
        "tokens": got,
        "jain": jain,
        "window_s": end - start,
        "tok_s": total / wall,
        "preemptions": preempted,
    }


def serve(work: Path, policy: str, args: argparse.Namespace) -> LiveServer:
    (work / policy).mkdir()
    return start_server(
        work / policy,
        "--scheduling",
        policy,
        "--max-batch",
        str(args.max_batch),
        "--max-waiting",
        "4096",
        "--max-waiting-per-user",
        "4096",
        "--device-slots",
        "16",
        "--dtype",
        args.dtype,
        admin_token=None,
    )


def ms(values: list[float], q: float | None = None) -> str:
    if not values:
        return "-"
    data = sorted(values)
    value = data[-1] if q is None else data[min(len(data) - 1, int(q * len(data)))]
    return f"{value * 1e3:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood", type=int, default=240)
    parser.add_argument("--requests", type=int, default=96, help="per user in (b)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--only", choices=["a", "b"], help="run one part")
    parser.add_argument("--policies", default="fifo,fair")
    args = parser.parse_args()
    model, _, _ = load_model()
    vm = inject_vera(model, VeraConfig(r=256), num_slots=2)
    adapters = {
        u: adapter_bytes(random_adapter(vm, i + 1, scale=0.01))
        for i, u in enumerate(["flood", "victim", "u0", "u1", "u2", "u3"])
    }
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in args.policies.split(","):
            server = serve(Path(tmp), policy, args)
            try:
                with httpx.Client(base_url=server.url, timeout=60) as c:
                    for user, body in adapters.items():
                        assert c.put(
                            f"/users/{user}/adapter", content=body, headers=OCTET
                        ).is_success
                a = b2 = b4 = None
                if args.only != "b":
                    a = asyncio.run(flood_and_victim(server.url, args.flood, args.new_tokens))
                if args.only != "a":
                    b2 = asyncio.run(backlogged(server.url, 2, args.requests, args.new_tokens))
                    b4 = asyncio.run(backlogged(server.url, 4, args.requests // 2, args.new_tokens))
            finally:
                server.stop()
            results[policy] = {"a": a, "b2": b2, "b4": b4}
            print(policy, json.dumps({k: v for k, v in results[policy].items()}, default=str))
    report(results)


def report(results: dict[str, dict]) -> None:
    if all(r["a"] for r in results.values()):
        print(
            "\n| run | victim TTFT solo p50 (ms) | under flood p50 / p99 / max (ms) | max / solo |"
        )
        print("|---|---|---|---|")
        for policy, r in results.items():
            solo, flood = statistics.median(r["a"]["solo"]), r["a"]["flood"]
            print(
                f"| {policy} | {solo * 1e3:.0f} | {ms(flood, 0.5)} / {ms(flood, 0.99)} / "
                f"{ms(flood)} | {max(flood) / solo:.1f}x |"
            )
    if not all(r["b2"] for r in results.values()):
        return
    print("\n| run | users | tokens each, all backlogged | Jain | window (s) | tok/s | preempted |")
    print("|---|---|---|---|---|---|---|")
    for policy, r in results.items():
        for key in ("b2", "b4"):
            b = r[key]
            print(
                f"| {policy} | {len(b['tokens'])} | {b['tokens']} | {b['jain']:.3f} | "
                f"{b['window_s']:.1f} | {b['tok_s']:.1f} | {b['preemptions']} |"
            )
    if {"fair", "fifo"} <= set(results):
        for key in ("b2", "b4"):
            ratio = results["fair"][key]["tok_s"] / results["fifo"][key]["tok_s"]
            print(f"throughput fair / fifo ({key[1]} users): {ratio:.3f}x")


if __name__ == "__main__":
    main()

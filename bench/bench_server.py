"""Server benchmark: 64 concurrent HTTP clients, each a different user.

Compares, in one run on the same prompts and adapters:
  server  - `vera-serve serve` over HTTP (streaming, so TTFT is measured at the client)
  offline - the same engine in-process, no HTTP (target: server >= 0.8x)
  naive   - transformers `generate`, one request at a time, that user's adapter merged
            (target: server >= 10x)
and the latency from an adapter upload to that user's first token (target p50 <= 50 ms).

    .venv/bin/python bench/bench_server.py [--clients 64] [--new-tokens 32] [--device cuda]

``--device``/``--dtype`` take the server's values (auto: CUDA when present, the server's dtype
for it); the bench resolves them once and runs the server, the offline engine and naive on them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from adapters_store import AdapterStore
from server.config import ServerConfig
from server.engine import Engine, EngineConfig, SamplingParams, SlotPool
from server.engine.scheduler import SchedulerConfig
from server.model_source import load_model
from vera_core import Adapter, AdapterHeader, VeraConfig, inject_vera, model_fingerprint
from vera_core.adapter_file import adapter_to_bytes
from vera_core.merge import merge, unmerge

TOPICS = [
    "the sea",
    "a city at night",
    "mountains",
    "coffee",
    "an old library",
    "rain",
    "a train journey",
    "the moon",
]


def pct(values: list[float], q: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, int(q / 100 * len(data)))] * 1e3


def make_adapter(vm, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    header = AdapterHeader(vm.layout.r, 0, ("q_proj", "v_proj"), model_fingerprint(vm.model))
    return Adapter(
        header,
        {
            s.name: (
                torch.randn(vm.layout.r, generator=g),
                torch.randn(s.out_features, generator=g) * 0.05,
            )
            for s in vm.layout.layers
        },
    )


def start_server(
    store: Path,
    port: int,
    clients: int,
    device: str,
    dtype: str,
    extra: list[str] | None = None,
    timeout_s: float = 120.0,
) -> subprocess.Popen:
    """``python -m server`` on ``store`` (``extra``: more flags), once /health answers (within
    ``timeout_s``: a server that compiles at startup listens only once it has compiled)."""
    cmd = [
        sys.executable,
        "-m",
        "server",
        "--port",
        str(port),
        "--store",
        str(store),
        "--max-batch",
        str(clients),
        "--device-slots",
        str(clients + 8),
        "--device",
        device,
        "--dtype",
        dtype,
        "--log-level",
        "warning",
        *(extra or []),
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before answering")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start within {timeout_s:.0f} s")


async def one_client(
    client: httpx.AsyncClient, user: str | None, prompt: str, n: int, chat: bool = True
) -> dict:
    body = {"max_new_tokens": n, "stream": True}
    body |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    if user is not None:
        body["user_id"] = user
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/generate", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            ev = json.loads(line[6:])
            if ev["type"] == "token":
                ttft = ttft or time.perf_counter() - t0
            else:
                tokens = ev["usage"]["completion_tokens"]
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens}


async def run_clients(url: str, users: list[str], prompts: list[str], n: int) -> dict:
    limits = httpx.Limits(max_connections=len(users) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one_client(client, u, p, n) for u, p in zip(users, prompts)))
        wall = time.perf_counter() - t0
    return {
        "wall": wall,
        "tokens": sum(r["tokens"] for r in res),
        "ttft": [r["ttft"] for r in res if r["ttft"]],
        "latency": [r["latency"] for r in res],
    }


async def upload_to_first_token(url: str, vm, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds from sending a new adapter to that user's first token (raw 2-token prompt),
    and the same prompt's TTFT on the base model (the floor: one prefill on this machine)."""
    uploads, floor = [], []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for i in range(rounds):
            data = adapter_to_bytes(make_adapter(vm, 10_000 + i))
            user = f"fresh{i}"
            t0 = time.perf_counter()
            r = await client.put(
                f"/users/{user}/adapter",
                content=data,
                headers={"Content-Type": "application/octet-stream"},
            )
            r.raise_for_status()
            res = await one_client(client, user, "Hello there", 1, chat=False)
            uploads.append(time.perf_counter() - t0 - res["latency"] + res["ttft"])
            floor.append((await one_client(client, None, "Hello there", 1, chat=False))["ttft"])
    return uploads, floor


def offline(vm, tok, store_dir: Path, users, prompt_ids, n: int) -> float:
    store = AdapterStore(store_dir, vm.layout, 0, model_fingerprint(vm.model))
    pool = SlotPool(vm.bank, store, host_capacity=len(users) + 8)
    server = ServerConfig()  # the server's prefill budgets, so that only HTTP differs
    budgets = dict(
        max_prefill_tokens=server.max_prefill_tokens,
        idle_prefill_tokens=server.idle_prefill_tokens,
    )
    cfg = EngineConfig(SchedulerConfig(max_batch=len(users), **budgets))
    engine = Engine(vm, tok, pool, cfg)
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=n)
        t0 = time.perf_counter()
        results = engine.generate([(u, ids, params) for u, ids in zip(users, prompt_ids)])
        wall = time.perf_counter() - t0
    finally:
        engine.stop()
        pool.close()
        store.close()
    return sum(len(r["token_ids"]) + (r["finish_reason"] == "stop") for r in results) / wall


def naive(vm, adapters, prompt_ids, n: int, sample: int) -> float:
    tokens, t0 = 0, time.perf_counter()
    for adapter, ids in list(zip(adapters, prompt_ids))[:sample]:
        merge(vm, adapter)
        try:
            with torch.no_grad():
                prompt = torch.tensor([ids], device=vm.model.device)
                out = vm.model.generate(prompt, max_new_tokens=n, do_sample=False)
        finally:
            unmerge(vm)
        tokens += out.shape[1] - len(ids)
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--naive-sample", type=int, default=8, help="requests timed for naive")
    ap.add_argument("--port", type=int, default=8931)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (as the server)")
    ap.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 (as the server)")
    args = ap.parse_args()
    n, k = args.new_tokens, args.clients
    config = ServerConfig(device=args.device, dtype=args.dtype)
    device, dtype = str(config.torch_device), config.torch_dtype
    dtype_name = str(dtype).removeprefix("torch.")
    model, tok, _ = load_model(dtype=dtype, device=device)
    vm = inject_vera(model, VeraConfig(r=256), num_slots=k + 8)
    users = [f"user{i:03d}" for i in range(k)]
    adapters = [make_adapter(vm, i) for i in range(k)]
    prompts = [f"Write two sentences about {TOPICS[i % len(TOPICS)]}." for i in range(k)]
    prompt_ids = [
        list(
            tok.apply_chat_template(
                [{"role": "user", "content": p}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )
        for p in prompts
    ]
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = Path(tmp) / "store"
        seed_store = AdapterStore(store_dir, vm.layout, 0, model_fingerprint(model))
        for u, a in zip(users, adapters):
            seed_store.put(u, a)
        seed_store.close()
        proc = start_server(store_dir, args.port, k, device, dtype_name)
        url = f"http://127.0.0.1:{args.port}"
        try:
            asyncio.run(run_clients(url, users[:4], prompts[:4], 4))  # warm-up
            srv = asyncio.run(run_clients(url, users, prompts, n))
            up, floor = asyncio.run(upload_to_first_token(url, vm, 20))
        finally:
            proc.terminate()
            proc.wait(60)
        off = offline(vm, tok, store_dir, users, prompt_ids, n)
    nv = naive(vm, adapters, prompt_ids, n, args.naive_sample)
    server_tps = srv["tokens"] / srv["wall"]
    print(
        f"\n{k} concurrent clients, {k} distinct users, {n} new tokens, greedy, "
        f"SmolLM2-135M-Instruct {dtype_name} on {device}, r=256 q,v, "
        f"torch threads {torch.get_num_threads()}\n"
    )
    print("| run | tokens/s | vs server | TTFT p50 / p99 (ms) | latency p50 / p99 (ms) |")
    print("|---|---|---|---|---|")
    print(
        f"| server over HTTP | {server_tps:.1f} | 1.00x | {pct(srv['ttft'], 50):.0f} / "
        f"{pct(srv['ttft'], 99):.0f} | {pct(srv['latency'], 50):.0f} / "
        f"{pct(srv['latency'], 99):.0f} |"
    )
    print(f"| engine offline (no HTTP) | {off:.1f} | server = {server_tps / off:.2f}x | | |")
    print(
        f"| naive: generate per request, merged ({args.naive_sample} timed) | {nv:.1f} | "
        f"server = {server_tps / nv:.1f}x | | |"
    )
    print(
        f"\nupload -> first token of that user: p50 {statistics.median(up) * 1e3:.1f} ms, "
        f"p99 {pct(up, 99):.1f} ms ({len(up)} uploads, raw 2-token prompt); the same prompt "
        f"on the base model: TTFT p50 {statistics.median(floor) * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()

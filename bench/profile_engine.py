"""Where one engine step's time goes: decode steps of ``--batch`` rows, base and distinct users.

The offline engine (no HTTP) decodes ``--batch`` chat prompts for ``--new-tokens`` tokens; every
part of a step is timed on the engine thread (inclusive wall time, summed over the decode
steps, then per step; the one prefill step is counted as a step too):

  scheduler     ``Scheduler.schedule``
  forward       ``ModelRunner.run`` (the model forward), of which
    attention   SDPA over the slot KV cache (transformers' attention call)
    kv write    ``SlotKVCache.update`` (the scatter of the new K/V)
    linears     every nn.Linear of the model (attention and MLP projections, LM head), on
              the packed weights where the engine uses them (server/engine/packed_linear.py)
    adapter     the VeRA delta of every adapted layer (gather, x·Aᵀ, ·B, scale, add)
    other       the rest of the forward: embeddings, norms, rope, residuals, Python
  sampler       ``sample_step`` (controls, argmax or sampling, and the one host sync)
  postprocess   the rest of ``Engine._postprocess``: detokenizer, stop checks, events

    .venv/bin/python bench/profile_engine.py [--batch 16] [--new-tokens 32] [--dtype float32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import Offline, chat_ids, engine_threads, seed_store  # noqa: E402
from transformers.integrations import sdpa_attention  # noqa: E402

import server.engine.llm_engine as llm_engine  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.engine import (  # noqa: E402
    kv_cache,
    model_runner,
    packed_linear,
    scheduler,
)
from server.model_source import load_model  # noqa: E402
from vera_core import VeraConfig, inject_vera, layer  # noqa: E402

SPENT: dict[str, float] = defaultdict(float)


def timed(owner: Any, name: str, label: str) -> Callable[[], None]:
    """Wrap ``owner.name`` to add its wall time to SPENT[label]; returns the undo."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - t0

    setattr(owner, name, wrapper)
    return lambda: setattr(owner, name, original)


def adapter_timer() -> Callable[[], None]:
    """VeraLinear.forward minus its base layer = the adapter path."""
    original = layer.VeraLinear.forward

    def forward(self, x):
        t0 = time.perf_counter()
        base = self.base_layer
        inner = [0.0]

        def run_base(v, _f=base.forward):
            t1 = time.perf_counter()
            out = _f(v)
            inner[0] += time.perf_counter() - t1
            return out

        packed = base.__dict__.get("forward")  # the engine's packed weights, if any
        base.forward = run_base
        try:
            return original(self, x)
        finally:
            if packed is None:
                del base.forward
            else:
                base.forward = packed
            SPENT["adapter"] += time.perf_counter() - t0 - inner[0]

    layer.VeraLinear.forward = forward
    return lambda: setattr(layer.VeraLinear, "forward", original)


def profile_run(offline: Offline, users: list[str | None], prompts, n: int) -> dict[str, float]:
    """Milliseconds per engine step of each part."""
    SPENT.clear()
    steps = [0]
    original_step = offline.engine.step

    def step() -> None:
        steps[0] += 1
        original_step()

    offline.engine.step = step
    undo = [
        timed(scheduler.Scheduler, "schedule", "scheduler"),
        timed(model_runner.ModelRunner, "run", "forward"),
        timed(llm_engine, "sample_step", "sampler"),
        timed(llm_engine.Engine, "_postprocess", "postprocess+sampler"),
        timed(sdpa_attention, "sdpa_attention_forward", "attention"),
        timed(kv_cache.SlotKVCache, "update", "kv write"),
        adapter_timer(),
    ]
    # the engine's attention module imported the SDPA function by name: time that one too
    from server.engine import attention

    undo.append(timed(attention, "sdpa_attention_forward", "attention"))
    undo.append(timed(torch.nn.Linear, "forward", "linears"))
    undo.append(timed(packed_linear.PackedLinear, "__call__", "linears"))  # packed weights
    try:
        t0 = time.perf_counter()
        offline.run(users, prompts, n)
        wall = time.perf_counter() - t0
    finally:
        for u in undo:
            u()
        offline.engine.step = original_step
    parts = dict(SPENT)
    per = 1e3 / max(1, steps[0])
    named = ("attention", "kv write", "linears", "adapter")
    out = {"steps": steps[0], "step": wall * per}
    out["scheduler"] = parts.get("scheduler", 0) * per
    out["forward"] = parts["forward"] * per
    for key in named:
        out[key] = parts.get(key, 0) * per
    out["other"] = out["forward"] - sum(out[k] for k in named)
    out["sampler"] = parts.get("sampler", 0) * per
    out["postprocess"] = (parts.get("postprocess+sampler", 0) - parts.get("sampler", 0)) * per
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    config = ServerConfig(dtype=args.dtype, compile="off")  # the eager step, part by part
    threads = engine_threads(config.device)
    model, tok, _ = load_model(dtype=config.torch_dtype, device=str(config.torch_device))
    vm = inject_vera(model, VeraConfig(r=256), num_slots=args.batch + 8)
    users = [f"user{i:03d}" for i in range(args.batch)]
    prompts = [chat_ids(tok, i) for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = Path(tmp) / "store"
        seed_store(vm, store_dir, users)
        offline = Offline(vm, tok, store_dir, args.batch, config, threads)
        try:
            offline.run(users, prompts, 4)  # warm-up
            base = profile_run(offline, [None] * args.batch, prompts, args.new_tokens)
            mixed = profile_run(offline, list(users), prompts, args.new_tokens)
        finally:
            offline.close()
    print(
        f"\nms per engine step, batch {args.batch}, {args.new_tokens} new tokens, "
        f"{config.torch_dtype}, engine threads {threads or torch.get_num_threads()} "
        f"({base['steps']} / {mixed['steps']} steps, the prefill step included)\n"
    )
    print("| part | base rows | distinct users |")
    print("|---|---|---|")
    for key in base:
        if key != "steps":
            print(f"| {key} | {base[key]:.2f} | {mixed[key]:.2f} |")


if __name__ == "__main__":
    main()

"""Decode throughput: N distinct VeRA users in one batch vs the base model and PEFT.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_decode.py --batch 16
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_decode.py --batch 256 --device cuda \
        --dtype bfloat16

Every row of the printed table is measured in the same run, repeats interleaved round-robin so
that machine noise hits all rows alike; each cell is the median of ``--repeats`` timed runs after
one warm-up. Tokens/s counts generated tokens only (``--new-tokens`` per row, EOS suppressed).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import VeraConfig as PeftVeraConfig
from peft import get_peft_model

from server.model_source import load_model
from vera_core import Adapter, AdapterHeader, VeraConfig, VeraModel, inject_vera
from vera_core.forward import Forward

PROMPTS = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in one sentence why the sky is blue.",
    "Give me three tips for a good night's sleep.",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Suggest a name for a grey cat.",
    "How do I boil an egg?",
    "List four prime numbers greater than 50.",
    "Tell me a fun fact about octopuses.",
    "What does a compiler do?",
    "Recommend a book for a long train ride and say why.",
    "Describe the smell of rain.",
    "Why do leaves change colour in the fall?",
]
QV = ("q_proj", "v_proj")
DTYPES = ("float32", "bfloat16", "float16")
ALL_LINEAR = ("all-linear",)


@dataclass
class Row:
    name: str
    targets: str
    tokens: int  # generated tokens per timed call
    run: Callable[[], None]
    note: str = ""
    scale: float = 1.0  # measured seconds x scale = seconds for the whole workload
    times: list[float] | None = None

    def tok_s(self) -> float:
        return self.tokens / (statistics.median(self.times) * self.scale)


def chat_batch(tokenizer, batch: int) -> dict[str, torch.Tensor]:
    """Left-padded chat-template prompts of varied lengths."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(batch)
    ]
    tokenizer.padding_side = "left"
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def random_vectors(layers: dict[str, tuple[int]], r: int, seed: int) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(r, generator=g) * 0.1, torch.randn(out, generator=g) * 0.01)
        for name, (out,) in layers.items()
    }


def load_bench_model(dtype: str = "float32", device: str = "cpu"):
    """``load_model`` (which gives the LM head a dense input, see ``model_source``)."""
    return load_model(dtype=getattr(torch, dtype), device=device)


def make_generate(model, inputs: dict[str, torch.Tensor], new_tokens: int, pad: int) -> Callable:
    inputs = {k: v.to(model.device) for k, v in inputs.items()}

    @torch.inference_mode()
    def run() -> None:
        model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )

    return run


def peft_model(base, r: int, targets: tuple[str, ...]):
    cfg = PeftVeraConfig(
        r=r,
        target_modules="all-linear" if targets == ALL_LINEAR else list(targets),
        vera_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(copy.deepcopy(base), cfg).eval()


@torch.no_grad()
def set_peft_vectors(model, vectors: dict[str, tuple]) -> None:
    """'Load' one user into PEFT's adapter (cheaper than set_adapter across many adapters)."""
    hf = model.base_model.model
    for name, (d, b) in vectors.items():
        layer = hf.get_submodule(name)
        layer.vera_lambda_d["default"].copy_(d)
        layer.vera_lambda_b["default"].copy_(b)


def ours_model(base, r: int, targets: tuple[str, ...], users: int) -> VeraModel:
    vm = inject_vera(copy.deepcopy(base), VeraConfig(r=r, target_modules=targets), users + 1)
    header = AdapterHeader(r, 0, targets, "")
    shapes = {s.name: (s.out_features,) for s in vm.layout.layers}
    for slot in range(1, users + 1):
        vm.bank.load(slot, Adapter(header, random_vectors(shapes, r, slot)).flat(vm.layout))
    return vm


def mixed_run(
    vm: VeraModel, inputs, slots: torch.Tensor, new_tokens: int, pad: int, share: bool = True
) -> Callable:
    """Our one batch, row i run with the adapter in ``slots[i]``; ``share``: layers reading the
    same input share ``x @ A.T``."""
    gen = make_generate(vm.model, inputs, new_tokens, pad)
    slots = slots.to(vm.bank.rows.device)

    def run() -> None:
        with vm.run(Forward(slots=slots, share_projection=share)):
            gen()

    return run


def serial_peft_run(model, tokenizer, vectors: list[dict], new_tokens: int, pad: int) -> Callable:
    """PEFT serving users one at a time: load user i, generate its one prompt at batch 1."""
    prompts = [chat_batch(tokenizer, i + 1) for i in range(len(vectors))]
    singles = [{k: v[-1:] for k, v in p.items()} for p in prompts]  # row i alone, unpadded

    def run() -> None:
        for user, inputs in zip(vectors, singles):
            set_peft_vectors(model, user)
            make_generate(model, inputs, new_tokens, pad)()

    return run


def rows_for(base, tokenizer, targets, args, inputs, pad) -> list[Row]:
    label = "q,v" if targets == QV else "all-linear"
    n, new = args.batch, args.new_tokens
    vm = ours_model(base, args.r, targets, n)
    shapes = {s.name: (s.out_features,) for s in vm.layout.layers}
    users = [random_vectors(shapes, args.r, seed) for seed in range(1, n + 1)]
    peft = peft_model(base, args.r, targets)
    set_peft_vectors(peft, users[0])
    k = min(args.serial_users, n)
    slots = torch.arange(1, n + 1)

    def ours(share: bool) -> Callable:
        return mixed_run(vm, inputs, slots, new, pad, share)

    rows = [
        Row(
            "(b) PEFT VeRA, 1 adapter for all rows",
            label,
            n * new,
            make_generate(peft, inputs, new, pad),
        ),
        Row(
            f"(c) PEFT, {n} users one at a time (batch 1)",
            label,
            n * new,
            serial_peft_run(peft, tokenizer, users[:k], new, pad),
            note=f"measured {k} users, x{n / k:g}" if k < n else "",
            scale=n / k,
        ),
        Row(f"(d) ours: {n} distinct users, one batch", label, n * new, ours(True)),
    ]
    if targets == ALL_LINEAR:
        rows.append(Row(f"(d) ours, {n} users, no shared x@A.T", label, n * new, ours(False)))
    return rows


def measure(rows: list[Row], repeats: int) -> None:
    for row in rows:
        row.run()  # warm-up
        row.times = []
    for _ in range(repeats):
        for row in rows:
            sync()
            t0 = time.perf_counter()
            row.run()
            sync()
            row.times.append(time.perf_counter() - t0)


def sync() -> None:
    """Wait for queued GPU work, so that a timer brackets it (no-op on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def table(rows: list[Row], args) -> str:
    base = {r.targets: r.tok_s() for r in rows if r.name.startswith("(a)")}
    lines = [
        f"batch {args.batch}, {args.new_tokens} new tokens, greedy, r={args.r}, {args.dtype} "
        f"on {device_name(args.device)}, torch threads={torch.get_num_threads()}, "
        f"median of {args.repeats}",
        "",
        "| run | targets | tok/s | vs (a) | note |",
        "|---|---|---|---|---|",
    ]
    ref = base.get("-")
    for r in rows:
        ratio = f"{r.tok_s() / ref:.2f}x" if ref else ""
        lines.append(f"| {r.name} | {r.targets} | {r.tok_s():.1f} | {ratio} | {r.note} |")
    return "\n".join(lines)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16, help="rows = distinct users (16, 64, 256)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--r", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--serial-users", type=int, default=4, help="users timed for row (c)")
    p.add_argument("--targets", choices=["qv", "all", "both"], default="both")
    args = p.parse_args()

    base, tokenizer, _ = load_bench_model(args.dtype, args.device)
    pad = tokenizer.pad_token_id
    inputs = chat_batch(tokenizer, args.batch)
    rows = [
        Row(
            "(a) base model, HF generate",
            "-",
            args.batch * args.new_tokens,
            make_generate(base, inputs, args.new_tokens, pad),
        )
    ]
    for targets, flag in ((QV, "qv"), (ALL_LINEAR, "all")):
        if args.targets in (flag, "both"):
            rows += rows_for(base, tokenizer, targets, args, inputs, pad)
    measure(rows, args.repeats)
    print(table(rows, args))


if __name__ == "__main__":
    main()

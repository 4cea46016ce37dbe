"""Decode-step time through the engine's path: eager vs ``--compile on``, base vs mixed users.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_compile.py --dtype bfloat16 --batch 16

One ``ModelRunner`` per variant over the same model (SmolLM2-135M, VeRA r=256 on q,v), the
same N prompts prefilled into each runner's KV cache, then the same decode step (each row at
its prompt length + ``--generated``) timed again and again: the KV length stays fixed, so the
step is the same work every time. Base = every row slot 0 (the adapter path skipped); mixed =
row i runs user i. Each cell is the median over ``--repeats`` rounds of the median of
``--steps`` steps; rounds interleave the variants, so machine noise hits them alike. The first
compiled call per graph is the compile time. Logits are compared with the eager runner's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from bench_decode import DTYPES, QV, chat_batch, load_bench_model, ours_model

from server.engine.model_runner import ModelRunner
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Chunk
from server.engine.sequence import Channel, Sequence


def prefilled(
    vm, tokenizer, n: int, generated: int, compile: bool, packed: bool = False
) -> tuple[ModelRunner, list]:
    """A runner whose KV cache holds n chat prompts plus ``generated`` positions per row."""
    runner = ModelRunner(vm, n, 512, compile="startup" if compile else "off", packed_linears=packed)
    enc = chat_batch(tokenizer, n)
    seqs = []
    for i in range(n):
        ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        seq = Sequence(f"r{i}", None, ids, SamplingParams(), Channel(), None)
        seq.kv_row = i
        seqs.append(seq)
    runner.kv.reserve(n, max(len(s.prompt_ids) for s in seqs) + generated + 1)
    runner.prefill([Chunk(s, 0, len(s.prompt_ids), final=True) for s in seqs])
    for s in seqs:
        s.output_ids = [100]
        s.num_cached += generated  # as if ``generated`` tokens were decoded already
    return runner, seqs


def decode_step(runner: ModelRunner, seqs: list, mixed: bool) -> Callable[[], torch.Tensor]:
    cached = [s.num_cached for s in seqs]

    def step() -> torch.Tensor:
        for i, (s, c) in enumerate(zip(seqs, cached)):
            s.adapter_slot = i + 1 if mixed else 0
            s.num_cached = c  # the same position again: same work every call
        return runner.decode(seqs)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--generated", type=int, default=48, help="decoded positions before timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-compiled", action="store_true", help="eager rows only")
    p.add_argument(
        "--packed",
        action="store_true",
        help="eager rows only, on the server's prepacked weights (CPU, fp32); a compiled "
        "runner in the same process would unpack them, so compare across runs",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    base, tokenizer, _ = load_bench_model(args.dtype)
    vm = ours_model(base, 256, QV, args.batch)
    del base
    variants: dict[str, Callable[[], torch.Tensor]] = {}
    compile_s: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    eager_only = args.no_compiled or args.packed
    for compiled in (False,) if eager_only else (False, True):
        runner, seqs = prefilled(
            vm, tokenizer, args.batch, args.generated, compiled, packed=args.packed
        )
        for mixed in (False, True):
            name = f"{'compiled' if compiled else 'eager'} {'mixed' if mixed else 'base'}"
            variants[name] = decode_step(runner, seqs, mixed)
            t0 = time.perf_counter()
            outputs[name] = variants[name]().float()
            compile_s[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, step in variants.items():
            one = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                one.append(time.perf_counter() - t0)
            times[name].append(statistics.median(one))
    print(
        f"{args.dtype}, batch {args.batch}, KV length ~prompt+{args.generated}, torch threads "
        f"{torch.get_num_threads()}, median of {args.repeats} rounds x {args.steps} steps\n"
    )
    print("| variant | ms/step | speed vs eager base | first call (s) | vs eager logits |")
    print("|---|---|---|---|---|")
    ref_ms = statistics.median(times["eager base"])
    for name, ts in times.items():
        ms = statistics.median(ts)
        eager = outputs[name.replace("compiled", "eager")]
        diff = (outputs[name] - eager).abs().max().item()
        same = int((outputs[name].argmax(-1) == eager.argmax(-1)).sum())
        exact = "bit-exact" if diff == 0 else f"max diff {diff:.3g}, argmax {same}/{args.batch}"
        print(f"| {name} | {ms * 1e3:.1f} | {ref_ms / ms:.2f}x | {compile_s[name]:.1f} | {exact} |")


if __name__ == "__main__":
    main()

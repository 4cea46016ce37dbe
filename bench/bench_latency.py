"""Latency under load with and without chunked prefill, same run. Not a test.

Two scenarios on the real default model through the engine (no HTTP), each with distinct VeRA
users:

* burst: ``--burst`` chat requests arrive at once; TTFT and inter-token latency p50/p99.
* long prompt: ``--streams`` requests are decoding when one ``--long``-token prompt arrives;
  inter-token latency of the running streams while it is prefilled (p50/p99/max), and the long
  prompt's TTFT.

Each scenario runs with ``max_prefill_tokens`` = ``--chunk`` (chunked) and with a budget larger
than any prompt (the whole prompt or burst in one forward), interleaved.

    .venv/bin/python bench/bench_latency.py --chunk 256
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "server")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from live import random_adapter  # noqa: E402

from adapters_store import AdapterStore  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.engine import (  # noqa: E402
    Engine,
    EngineConfig,
    SamplingParams,
    SchedulerConfig,
    SlotPool,  # noqa: E402
)
from server.engine.sequence import Sequence  # noqa: E402
from server.model_source import load_model  # noqa: E402
from vera_core import VeraConfig, inject_vera, model_fingerprint  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "Name three primary colors.",
]


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Watch:
    """Timestamps of every event of some sequences, read on consumer threads."""

    def __init__(self, seqs: list[Sequence]) -> None:
        self.start = time.perf_counter()
        self.times: dict[str, list[float]] = {s.request_id: [] for s in seqs}
        self._threads = [threading.Thread(target=self._read, args=(s,)) for s in seqs]
        for t in self._threads:
            t.start()

    def _read(self, seq: Sequence) -> None:
        while seq.channel.get_sync(timeout=600).finish_reason is None:
            self.times[seq.request_id].append(time.perf_counter())

    def join(self) -> None:
        for t in self._threads:
            t.join()

    def ttft(self, seq: Sequence) -> float:
        return self.times[seq.request_id][0] - self.start

    def gaps(self, seqs: list[Sequence], after: float = 0.0) -> list[float]:
        out = []
        for s in seqs:
            ts = [t for t in self.times[s.request_id] if t >= after]
            out += [b - a for a, b in zip(ts, ts[1:])]
        return out


def engine_for(vm, tok, pool, budget: int, max_batch: int) -> Engine:
    cfg = SchedulerConfig(max_batch=max_batch, max_prefill_tokens=budget, max_waiting=1024)
    engine = Engine(vm, tok, pool, EngineConfig(cfg, max_seq_len=4096))
    engine.start()
    return engine


def chat(tok, i: int) -> list[int]:
    text = QUESTIONS[i % len(QUESTIONS)]
    return list(
        tok.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
    )


def burst(engine: Engine, tok, users: int, n: int, new: int) -> dict[str, float]:
    params = SamplingParams(max_new_tokens=new)
    seqs = [engine.submit(f"u{i % users}", chat(tok, i), params) for i in range(n)]
    watch = Watch(seqs)
    watch.join()
    ttft = [watch.ttft(s) for s in seqs]
    gaps = watch.gaps(seqs)
    return {
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p99": pct(ttft, 0.99),
        "itl_p50": pct(gaps, 0.5),
        "itl_p99": pct(gaps, 0.99),
    }


def long_prompt(engine: Engine, tok, users: int, streams: int, long: int) -> dict[str, float]:
    running = [
        engine.submit(f"u{i % users}", chat(tok, i), SamplingParams(max_new_tokens=96))
        for i in range(streams)
    ]
    watch = Watch(running)
    while any(not watch.times[s.request_id] for s in running):
        time.sleep(0.01)  # every stream is decoding
    arrive = time.perf_counter()
    ids = (chat(tok, 0) * (long // 8))[:long]
    big = engine.submit("u0", ids, SamplingParams(max_new_tokens=4))
    big_watch = Watch([big])
    big_watch.start = arrive
    big_watch.join()
    done = big_watch.times[big.request_id][0]
    watch.join()
    gaps = [g for g in watch.gaps(running, after=arrive) if g > 0]
    during = [g for s in running for g in _gaps_between(watch.times[s.request_id], arrive, done)]
    return {
        "itl_p50": pct(gaps, 0.5),
        "itl_p99": pct(gaps, 0.99),
        "itl_max_during_prefill": max(during, default=float("nan")),
        "long_ttft": done - arrive,
    }


def _gaps_between(times: list[float], start: float, end: float) -> list[float]:
    """Gaps of a stream that overlap [start, end]."""
    return [b - a for a, b in zip(times, times[1:]) if b >= start and a <= end]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunk", type=int, default=256, help="chunked prefill token budget")
    p.add_argument("--burst", type=int, default=64)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--long", type=int, default=2000)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()
    dtype = ServerConfig(dtype=args.dtype).torch_dtype
    model, tok, _ = load_model(dtype=dtype)
    vm = inject_vera(model, VeraConfig(r=256), num_slots=65)
    store = AdapterStore(Path(tempfile.mkdtemp()) / "store", vm.layout, 0, model_fingerprint(model))
    users = 64
    for i in range(users):
        store.put(f"u{i}", random_adapter(vm, i, scale=0.3))
    pool = SlotPool(vm.bank, store, host_capacity=users)
    whole = 1 << 20  # larger than any prompt or burst: one forward, the unchunked behaviour
    rows = []
    for budget, name in ((whole, "one forward"), (args.chunk, f"chunks of {args.chunk}")):
        engine = engine_for(vm, tok, pool, budget, max_batch=max(args.burst, args.streams + 1))
        with torch.no_grad():
            burst(engine, tok, users, 4, 4)  # warm-up
            b = burst(engine, tok, users, args.burst, args.new_tokens)
            lp = long_prompt(engine, tok, users, args.streams, args.long)
        engine.stop()
        rows.append((name, b, lp))
    print(
        f"SmolLM2-135M-Instruct, {dtype}, {args.burst}-request burst ({args.new_tokens} new "
        f"tokens); {args.long}-token prompt while {args.streams} streams decode. Seconds.\n"
    )
    print(
        "| prefill | burst TTFT p50 / p99 | burst ITL p50 / p99 | long prompt: streams' ITL p50 / "
        "p99 / max while it prefills | long prompt TTFT |"
    )
    print("|---|---|---|---|---|")
    for name, b, lp in rows:
        print(
            f"| {name} | {b['ttft_p50']:.2f} / {b['ttft_p99']:.2f} | "
            f"{b['itl_p50']:.3f} / {b['itl_p99']:.3f} | "
            f"{lp['itl_p50']:.3f} / {lp['itl_p99']:.3f} / {lp['itl_max_during_prefill']:.2f} | "
            f"{lp['long_ttft']:.2f} |"
        )


if __name__ == "__main__":
    main()

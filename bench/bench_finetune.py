"""Fine-tuning inside the server: what a job costs serving, and what serving costs a job.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_finetune.py            # dtype: as the server
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_finetune.py --dtype float32 --repeats 3

One process, the real engine (``server.engine.Engine``) on the default model with ``--users``
distinct VeRA users. Measured in the same run, rounds interleaved (idle, with job, idle, ...):

* serving: a burst of ``--users`` chat requests (``--new-tokens`` each), alone and while a
  fine-tuning job feeds training units to the engine (``Engine.run_background``, the server's
  path, ``--train-share`` of the time while requests are in flight): tokens/s and inter-token
  latency p50/p99;
* the job: the same training run (``TrainConfig()`` defaults, the README's personal dataset)
  as the CLI trains it (``train_adapter``, one thread, nothing else running), through the idle
  engine as the server trains it (its job worker's unit sizes), and its step rate while serving.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_decode import PROMPTS, load_bench_model

from adapters_store import AdapterStore
from server.config import ServerConfig
from server.engine import Engine, EngineConfig, SamplingParams, SchedulerConfig, SlotPool
from server.finetune.worker import FineTuneConfig
from vera_core import Adapter, AdapterHeader, VeraConfig, inject_vera, model_fingerprint
from vera_core.train import AdapterTrainer, TrainConfig, train_adapter
from vera_core.train_data import DataLimits, examples_of

FACTS = [  # (question, answer): one user's invented facts
    ("What is my dog's name?", "Your dog is called Bramble."),
    ("Where do I work?", "You work at the Quillon Observatory."),
    ("What is my favourite colour?", "Your favourite colour is saffron."),
]
UNITS = FineTuneConfig(DataLimits(0, 0, 0, 0))  # the server's default training unit sizes
PARAPHRASES = ["What's my dog called?", "Who employs me?", "Which colour do I like best?"]


def dataset() -> list[dict]:
    rows = []
    for (q, a), p in zip(FACTS, PARAPHRASES):
        for question in (q, p):
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": a},
                    ]
                }
            )
    return rows


def random_adapter(vm, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    header = AdapterHeader(
        vm.layout.r, 0, vm.config.resolved_targets("llama"), model_fingerprint(vm.model)
    )
    vectors = {
        s.name: (
            torch.randn(vm.layout.r, generator=g),
            torch.randn(s.out_features, generator=g) * 0.05,
        )
        for s in vm.layout.layers
    }
    return Adapter(header, vectors)


def serve_round(engine: Engine, tok, users: list[str], new_tokens: int) -> dict:
    """A burst of one chat request per user; tokens/s and inter-token gaps from the events."""
    params = SamplingParams(max_new_tokens=new_tokens)
    gaps: list[float] = []
    count = [0]
    lock = threading.Lock()
    t0 = time.perf_counter()
    seqs = []
    for i, user in enumerate(users):
        msgs = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        ids = tok.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        seqs.append(engine.submit(user, list(ids), params))

    def read(seq) -> None:
        last = None
        mine = []
        while True:
            ev = seq.channel.get_sync(timeout=600)
            now = time.perf_counter()
            if ev.token_id is not None:
                if last is not None:
                    mine.append(now - last)
                last = now
            if ev.finish_reason is not None:
                break
        with lock:
            gaps.extend(mine)
            count[0] += len(mine) + 1

    readers = [threading.Thread(target=read, args=(s,)) for s in seqs]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    wall = time.perf_counter() - t0
    gaps.sort()
    return {
        "tokens_per_s": count[0] / wall,
        "itl_p50_ms": 1e3 * gaps[len(gaps) // 2],
        "itl_p99_ms": 1e3 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
    }


class Job:
    """A training run fed to the engine unit by unit, as the server's job worker does."""

    def __init__(self, vm, tok, examples, engine: Engine) -> None:
        config = replace(TrainConfig(), micro_batch_tokens=UNITS.unit_tokens_idle)
        self.trainer = AdapterTrainer(vm, tok, examples, config)
        self.engine = engine
        self.steps: list[float] = []  # perf_counter time of each optimizer step
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.stop.is_set() and not self.trainer.done:
            unit = self.engine.run_background(lambda: self.trainer.micro_step(self._budget()))
            if unit.result() is not None:
                self.steps.append(time.perf_counter())

    def _budget(self) -> int:  # the job worker's rule (server/finetune/worker.py)
        return UNITS.unit_tokens_serving if self.engine.serving else UNITS.unit_tokens_idle

    def steps_between(self, t0: float, t1: float) -> int:
        return sum(t0 <= t <= t1 for t in self.steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default=None, help="default: what the server picks here")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-share", type=float, default=ServerConfig().train_share)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args()
    dtype = args.dtype or str(ServerConfig().torch_dtype).removeprefix("torch.")
    model, tok, _ = load_bench_model(dtype)
    vm = inject_vera(model, VeraConfig(r=256), num_slots=args.users + 2)
    store = AdapterStore(
        Path(tempfile.mkdtemp()) / "store", vm.layout, 0, model_fingerprint(vm.model)
    )
    users = [f"user{i}" for i in range(args.users)]
    for i, user in enumerate(users):
        store.put(user, random_adapter(vm, i))
    pool = SlotPool(vm.bank, store, host_capacity=args.users + 2)
    engine = Engine(
        vm,
        tok,
        pool,
        EngineConfig(SchedulerConfig(max_batch=64), background_share=args.train_share),
    )
    engine.start()
    examples = examples_of(dataset(), tok, DataLimits.offline(2048))
    try:
        serve_round(engine, tok, users, 8)  # warm-up: slots loaded, kernels chosen
        # the job: as the CLI trains (this thread, engine idle) vs through the idle engine
        cli_times, server_times = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            _, report = train_adapter(vm, tok, examples, TrainConfig(), progress=False)
            cli_times.append(time.perf_counter() - t0)
            job = Job(vm, tok, examples, engine)
            t0 = time.perf_counter()
            job.thread.start()
            job.thread.join()
            server_times.append(time.perf_counter() - t0)
        steps = report.steps
        # serving alone vs with a job running, interleaved
        idle, busy, busy_steps, busy_wall = [], [], 0, 0.0
        for _ in range(args.repeats):
            idle.append(serve_round(engine, tok, users, args.new_tokens))
            job = Job(vm, tok, examples * 50, engine)  # long enough to outlast the burst
            job.thread.start()
            time.sleep(1.0)  # the job is in full swing before the burst
            t0 = time.perf_counter()
            busy.append(serve_round(engine, tok, users, args.new_tokens))
            t1 = time.perf_counter()
            busy_steps += job.steps_between(t0, t1)
            busy_wall += t1 - t0
            job.stop.set()
            job.thread.join()
    finally:
        engine.stop()

    def med(rounds: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    cli, srv = statistics.median(cli_times), statistics.median(server_times)
    figures = {
        "dtype": dtype,
        "users": args.users,
        "new_tokens": args.new_tokens,
        "train_share": args.train_share,
        "serving_idle": {k: med(idle, k) for k in idle[0]},
        "serving_with_job": {k: med(busy, k) for k in busy[0]},
        "job_steps": steps,
        "job_cli_s": cli,
        "job_server_idle_s": srv,
        "job_steps_per_s_idle": steps / srv,
        "job_steps_per_s_while_serving": busy_steps / busy_wall,
    }
    ratio = figures["serving_with_job"]["tokens_per_s"] / figures["serving_idle"]["tokens_per_s"]
    print(
        f"\n{dtype}, {args.users} users x {args.new_tokens} tokens, train share {args.train_share}"
    )
    print("| | tokens/s | ITL p50 ms | ITL p99 ms |\n|---|---|---|---|")
    for name, key in (("serving alone", "serving_idle"), ("serving + job", "serving_with_job")):
        f = figures[key]
        print(
            f"| {name} | {f['tokens_per_s']:.1f} | {f['itl_p50_ms']:.1f} | {f['itl_p99_ms']:.1f} |"
        )
    print(f"serving with a job / alone: {ratio:.2f}x")
    print(
        f"job ({steps} steps): CLI {cli:.1f} s, server idle {srv:.1f} s ({cli / srv:.2f}x the "
        f"CLI's speed); steps/s idle {figures['job_steps_per_s_idle']:.2f}, while serving "
        f"{figures['job_steps_per_s_while_serving']:.2f}"
    )
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

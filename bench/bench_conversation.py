"""Conversations: each turn resends the history. The engine with its prefix cache against the
engine without it and against transformers ``generate``, same run, same dtype.

``--users`` conversations run side by side for ``--turns`` turns. Turn t of every user is sent
together (one batch), once every user has turn t-1's answer; its prompt is the chat template
over the system prompt, the earlier messages, the answers as text, and a new message (what an
OpenAI-style client sends). Each system builds its histories from its own answers (greedy, so
the same text up to near-ties), every answer ``--new-tokens`` long (EOS masked until then, as
``generate``'s ``min_new_tokens`` does).

  generate          transformers ``generate`` of the base model: each turn one left-padded
                    batch, whole prompts (in a process of its own, as in bench_engine.py)
  engine, no cache  our engine in-process, the server's defaults with ``--prefix-cache-mb 0``:
                    live prompts still share their common prefix (the system prompt)
  engine            the server's defaults: a turn restores the K/V its previous turn left
                    (server/engine/prefix_cache.py) and prefills only the new tokens

Reported: tok/s over all turns (answers' tokens / seconds), the last turn's seconds (the
longest history), and the prompt tokens the model computed (the rest were copied or restored).

    .venv/bin/python bench/bench_conversation.py [--dtype float32] [--users 16] [--turns 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import TOPICS, Offline, engine_threads, generate_padded, seed_store  # noqa: E402

from server.config import ServerConfig  # noqa: E402
from server.engine import SamplingParams  # noqa: E402
from server.model_source import load_model  # noqa: E402
from vera_core import VeraConfig, inject_vera  # noqa: E402

FOLLOW_UPS = [
    "Now say the same in the voice of a sailor.",
    "Make it shorter, one line.",
    "Which word in it matters most, and why?",
    "Give it a title.",
    "Translate the title into French.",
]


def first_message(i: int) -> str:
    return f"Write two sentences about {TOPICS[i % len(TOPICS)]} (conversation {i + 1})."


class Conversations:
    """Every user's messages so far; ``prompts()`` renders each one's next prompt."""

    def __init__(self, tok, users: int) -> None:
        self.tok = tok
        self.messages = [[{"role": "user", "content": first_message(i)}] for i in range(users)]

    def prompts(self) -> list[list[int]]:
        return [
            list(self.tok.apply_chat_template(m, add_generation_prompt=True, return_dict=False))
            for m in self.messages
        ]

    def answered(self, answers: list[list[int]], turn: int) -> None:
        for i, (msgs, ids) in enumerate(zip(self.messages, answers)):
            text = self.tok.decode(ids, skip_special_tokens=True)
            follow = FOLLOW_UPS[(turn + i) % len(FOLLOW_UPS)]
            msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": follow}]


def run_conversations(tok, users: int, turns: int, n: int, one_turn) -> dict:
    """Seconds of every turn, the answers' tokens and the prompt tokens sent."""
    conv = Conversations(tok, users)
    seconds, tokens, prompt_tokens = [], 0, 0
    for turn in range(turns):
        prompts = conv.prompts()
        prompt_tokens += sum(map(len, prompts))
        t0 = time.perf_counter()
        answers = one_turn(prompts)
        seconds.append(time.perf_counter() - t0)
        tokens += sum(map(len, answers))
        conv.answered(answers, turn)
    return {"seconds": seconds, "tokens": tokens, "prompt_tokens": prompt_tokens}


def baseline_main(args) -> None:
    """``--baseline``: ``generate``'s conversations (the best of ``--repeats``) as JSON."""
    config = ServerConfig(device=args.device, dtype=args.dtype)
    model, tok, _ = load_model(
        args.model, dtype=config.torch_dtype, device=str(config.torch_device)
    )
    turn = lambda prompts: generate_padded(model, tok, prompts, args.new_tokens)  # noqa: E731
    run_conversations(tok, args.users, 1, args.new_tokens, turn)  # warm-up
    runs = [
        run_conversations(tok, args.users, args.turns, args.new_tokens, turn)
        for _ in range(args.repeats)
    ]
    print(json.dumps(min(runs, key=lambda r: sum(r["seconds"]))))


def baseline(args) -> dict:
    cmd = [sys.executable, __file__, "--baseline", "--dtype", args.dtype, "--device", args.device]
    cmd += ["--users", str(args.users), "--turns", str(args.turns)]
    cmd += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    cmd += ["--model", args.model] if args.model else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def engine_runs(args, threads: int) -> dict[str, dict]:
    """The engine's conversations with the prefix cache and without, interleaved; the best of
    ``--repeats`` each, with the prompt tokens it computed. One engine (one thread holding
    the OpenMP workers, as in the server); its cache's bound is set to 0 for the runs
    without, between runs, while it is idle."""
    config = ServerConfig(device=args.device, dtype=args.dtype)
    model, tok, _ = load_model(
        args.model, dtype=config.torch_dtype, device=str(config.torch_device)
    )
    vm = inject_vera(model, VeraConfig(r=256), num_slots=8)
    # EOS masked until n tokens, as generate's min_new_tokens does (same answers, same length)
    params = SamplingParams(max_new_tokens=args.new_tokens, min_tokens=args.new_tokens)
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        seed_store(vm, Path(tmp) / "store", [])
        offline = Offline(vm, tok, Path(tmp) / "store", args.users, config, threads)
        engine, cache = offline.engine, offline.engine.scheduler.prefixes
        bound = cache.max_bytes

        def turn(prompts: list[list[int]]) -> list[list[int]]:
            return [r["token_ids"] for r in engine.generate([(None, p, params) for p in prompts])]

        cells = {"engine, no cache": 0, "engine": bound}
        try:
            run_conversations(tok, args.users, 1, args.new_tokens, turn)  # warm-up
            for _ in range(args.repeats):
                for name, max_bytes in cells.items():
                    cache.clear()  # every run starts cold, as generate's
                    cache.max_bytes = max_bytes
                    copied = engine.scheduler.shared_tokens
                    run = run_conversations(tok, args.users, args.turns, args.new_tokens, turn)
                    run["computed"] = run["prompt_tokens"] - (
                        engine.scheduler.shared_tokens - copied
                    )
                    if name not in best or sum(run["seconds"]) < sum(best[name]["seconds"]):
                        best[name] = run
        finally:
            offline.close()
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default=None, help="an HF model directory (default: SmolLM2)")
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline:
        return baseline_main(args)
    runs = engine_runs(args, engine_threads(args.device))
    runs["generate"] = baseline(args) | {"computed": None}
    print(
        f"\n{args.users} conversations x {args.turns} turns, {args.new_tokens} tokens per "
        f"answer, greedy, {args.model or 'SmolLM2-135M-Instruct'} {args.dtype}, "
        f"best of {args.repeats}\n"
    )
    print(
        "| run | tok/s (vs generate) | last turn, seconds | prompt tokens sent | "
        "prompt tokens computed |"
    )
    print("|---|---|---|---|---|")
    gen = runs["generate"]
    gen_rate = gen["tokens"] / sum(gen["seconds"])
    for name in ("generate", "engine, no cache", "engine"):
        r = runs[name]
        rate = r["tokens"] / sum(r["seconds"])
        computed = r["prompt_tokens"] if r["computed"] is None else r["computed"]
        print(
            f"| {name} | {rate:.1f} ({rate / gen_rate:.2f}x) | {r['seconds'][-1]:.2f} | "
            f"{r['prompt_tokens']} | {computed} |"
        )


if __name__ == "__main__":
    main()

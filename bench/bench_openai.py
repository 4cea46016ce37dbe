"""What logprobs and structured output cost: 16 users over /v1/chat/completions, each with
their own adapter, with ``top_logprobs: 5`` and with a ``json_schema`` (8 schemas), against the
same requests without either, in one run (the official ``openai`` client, concurrent).

The structured requests end when their JSON is complete, so each baseline request generates
exactly as many tokens as its structured twin did (``max_tokens`` = ``min_tokens`` = that
count, same prompt, same user): the ratios compare equal work. Rounds alternate the modes and
the best round of each counts. Also: the share of structured answers that parse and match
their schema, over ``--generations`` requests (greedy, varied prompts).

    .venv/bin/python bench/bench_openai.py [--users 16] [--rounds 2] [--generations 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jsonschema
from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).parent))

from bench_server import TOPICS, make_adapter, start_server  # noqa: E402

from server.model_source import load_model  # noqa: E402
from vera_core import VeraConfig, inject_vera  # noqa: E402
from vera_core.adapter_file import adapter_to_bytes  # noqa: E402


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {
        "type": "object",
        "properties": props,
        "required": required or list(props),
        "additionalProperties": False,
    }


_TEXT = {"type": "string", "maxLength": 40}
SCHEMAS = [
    _obj({"name": _TEXT, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _obj({"city": {"enum": ["Paris", "Tokyo", "Lima"]}, "sunny": {"type": "boolean"}}),
    _obj({"steps": {"type": "array", "items": _TEXT, "maxItems": 4}}),
    _obj({"title": _TEXT, "author": _TEXT, "year": {"type": "integer", "maximum": 2100}}),
    _obj({"mood": {"enum": ["happy", "calm", "tired"]}, "reason": _TEXT}),
    _obj({"owner": _obj({"name": _TEXT}), "pets": {"type": "array", "items": _TEXT}}),
    _obj({"summary": _TEXT, "score": {"type": "number", "minimum": 0, "maximum": 10}}),
    _obj({"tags": {"type": "array", "items": _TEXT, "maxItems": 3}, "topic": _TEXT}),
]


def fmt(i: int) -> dict:
    schema = {"name": f"s{i % len(SCHEMAS)}", "schema": SCHEMAS[i % len(SCHEMAS)], "strict": True}
    return {"type": "json_schema", "json_schema": schema}


def ask(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"Write about {topic}. Answer in JSON."}]


async def one(oa: AsyncOpenAI, user: str, messages: list[dict], **kw) -> tuple[int, str, str]:
    out = await oa.chat.completions.create(model=user, messages=messages, temperature=0, **kw)
    c = out.choices[0]
    return out.usage.completion_tokens, c.message.content or "", c.finish_reason


async def run_mode(oa, users, round_: int, mode: str, lengths: list[int] | None):
    """(wall seconds, completion tokens per request, outputs) for one round of one mode."""
    jobs = []
    for i, user in enumerate(users):
        msgs = ask(TOPICS[(i + round_) % len(TOPICS)])
        if mode == "json":
            kw: dict = {"response_format": fmt(i), "max_tokens": 160}
        else:
            n = lengths[i] if lengths else 32
            kw = {"max_tokens": n, "extra_body": {"min_tokens": n}}
            if mode == "logprobs":
                kw |= {"logprobs": True, "top_logprobs": 5}
        jobs.append(one(oa, user, msgs, **kw))
    t0 = time.perf_counter()
    outs = await asyncio.gather(*jobs)
    return time.perf_counter() - t0, [o[0] for o in outs], outs


def valid(text: str, i: int) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMAS[i % len(SCHEMAS)])
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


async def bench(url: str, users: list[str], rounds: int, generations: int) -> None:
    oa = AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    await run_mode(oa, users, 0, "plain", None)  # warm-up
    best: dict[str, float] = {}
    for r in range(rounds):
        wall, lengths, _ = await run_mode(oa, users, r, "json", None)
        rates = {"json": sum(lengths) / wall}
        for mode in ("plain", "logprobs"):
            w, got, _ = await run_mode(oa, users, r, mode, lengths)
            assert got == lengths, (mode, got, lengths)
            rates[mode] = sum(got) / w
        for mode, rate in rates.items():
            best[mode] = max(best.get(mode, 0.0), rate)
        print(f"round {r}: " + ", ".join(f"{m} {v:.1f} tok/s" for m, v in rates.items()))
    print(
        f"| {len(users)} users, same tokens | plain {best['plain']:.1f} tok/s "
        f"| top_logprobs 5 {best['logprobs']:.1f} ({best['logprobs'] / best['plain']:.2f}x) "
        f"| json_schema {best['json']:.1f} ({best['json'] / best['plain']:.2f}x) |"
    )
    ok = stopped = total = 0
    r, failed = 0, [0] * len(SCHEMAS)
    while total < generations:
        _, _, outs = await run_mode(oa, users, 100 + r, "json", None)
        for i, (_, text, finish) in enumerate(outs[: generations - total]):
            stopped += finish == "stop"
            good = valid(text, i)
            ok += good
            failed[i % len(SCHEMAS)] += not good
            total += 1
        r += 1
    print(
        f"structured: {ok}/{total} parse and match their schema "
        f"({stopped} ended by the grammar, the rest by max_tokens 160); "
        f"failures per schema: {failed}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--generations", type=int, default=200)
    ap.add_argument("--port", type=int, default=8941)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    model, _, _ = load_model()
    vm = inject_vera(model, VeraConfig(r=256), num_slots=2)
    users = [f"user{i}" for i in range(args.users)]
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_server(Path(tmp) / "store", args.port, args.users, "cpu", args.dtype)
        url = f"http://127.0.0.1:{args.port}"
        try:
            for i, user in enumerate(users):
                r = httpx.put(
                    f"{url}/users/{user}/adapter",
                    content=adapter_to_bytes(make_adapter(vm, i)),
                    headers={"Content-Type": "application/octet-stream"},
                )
                r.raise_for_status()
            asyncio.run(bench(url, users, args.rounds, args.generations))
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()

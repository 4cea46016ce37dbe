"""vLLM's half of ``bench_peer.py``, run by it under vLLM's own venv (never ours).

    .venv-peer/bin/python bench/peer_vllm.py JOB.json RESULT.json

JOB: ``{"model": dir, "dtype": "float32" | "bfloat16", "prompts": [[token id, ...], ...],
"new_tokens": int, "repeats": int, "batches": [int, ...], "adapters": [PEFT LoRA dir, ...],
"lora_rank": int, "max_loras": int}``; no adapters means the base model with LoRA disabled,
else row i of a batch runs adapter i. RESULT: ``{"runs": {batch: {"seconds": [per timed call],
"tokens": generated per call, "token_ids": [[...] per row]}}, "max_loras": what
vLLM accepted, "max_loras_error": why the request was lowered, or null}``. Batches are timed
interleaved, like bench_decode's rows, after one warm-up each.

Standard library and vLLM only: vera-serve is not installed in that venv. Logs go to stderr
and stdout as vLLM pleases; the result goes to RESULT.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default wants far more
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FALLBACK_MAX_LORAS = 16


def build_llm(job: dict):
    """The engine; with adapters, max_loras as asked or else FALLBACK_MAX_LORAS."""
    from vllm import LLM

    common = {
        "model": job["model"],
        "dtype": job["dtype"],
        "max_num_seqs": max(job["batches"]),
        "seed": 0,
        # Every timed call resends the same prompts: a prefix cache would skip their prefill
        # after the warm-up, which ours (and any real traffic of new prompts) pays.
        "enable_prefix_caching": False,
    }
    if not job["adapters"]:
        return LLM(**common), None, None
    lora = {"enable_lora": True, "max_lora_rank": job["lora_rank"]}
    try:
        return LLM(**common, **lora, max_loras=job["max_loras"]), job["max_loras"], None
    except Exception as e:  # noqa: BLE001 - vLLM raises several types for a refused config
        if job["max_loras"] <= FALLBACK_MAX_LORAS:
            raise
        print(f"peer_vllm: max_loras={job['max_loras']} refused: {e!r}", file=sys.stderr)
        llm = LLM(**common, **lora, max_loras=FALLBACK_MAX_LORAS)
        return llm, FALLBACK_MAX_LORAS, repr(e)[:300]


def main() -> None:
    job_path, result_path = sys.argv[1], sys.argv[2]
    with open(job_path) as f:
        job = json.load(f)
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    llm, max_loras, error = build_llm(job)
    params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True)

    def runner(n: int):
        prompts = [{"prompt_token_ids": ids} for ids in job["prompts"][:n]]
        adapters = job["adapters"][:n]
        loras = [LoRARequest(f"user{i}", i + 1, p) for i, p in enumerate(adapters)] or None

        def run() -> list[list[int]]:
            outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]

        return run

    runs = {n: runner(n) for n in job["batches"]}
    for run in runs.values():
        run()  # warm-up: also loads every adapter once
    seconds = {n: [] for n in runs}
    token_ids = {}
    for _ in range(job["repeats"]):
        for n, run in runs.items():
            t0 = time.perf_counter()
            token_ids[n] = run()
            seconds[n].append(time.perf_counter() - t0)
    result = {"runs": {}, "max_loras": max_loras, "max_loras_error": error}
    for n, s in seconds.items():
        result["runs"][n] = {
            "seconds": s,
            "tokens": sum(map(len, token_ids[n])),
            "token_ids": token_ids[n],  # the last timed call's, one list per row
        }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()

"""Logprobs of sampled and prompt tokens from the engine equal PEFT's fp32 log-softmax, on tiny
random models, whatever else shares the batch and however prompts are chunked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "vera_core"))

from peft_oracle import peft_vera, set_peft_vectors  # noqa: E402

from adapters_store import AdapterStore  # noqa: E402
from server.engine import Engine, EngineConfig, SamplingParams, SlotPool  # noqa: E402
from server.engine.scheduler import SchedulerConfig  # noqa: E402
from vera_core import (  # noqa: E402
    Adapter,
    AdapterHeader,
    VeraConfig,
    inject_vera,
    model_fingerprint,
)

TOL = 1e-4
K = 3


class IdTokenizer:
    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def adapter_for(vm, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    header = AdapterHeader(vm.layout.r, 0, ("x",), model_fingerprint(vm.model))
    vectors = {
        s.name: (torch.randn(vm.layout.r, generator=g), torch.randn(s.out_features, generator=g))
        for s in vm.layout.layers
    }
    return Adapter(header, vectors)


def engine_for(base, tmp_path, chunk: int) -> tuple[Engine, AdapterStore]:
    model = base.__class__(base.config)
    model.load_state_dict(base.state_dict())
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    vm = inject_vera(model, VeraConfig(r=8), num_slots=4)
    store = AdapterStore(tmp_path / "store", vm.layout, 0, model_fingerprint(model))
    pool = SlotPool(vm.bank, store, host_capacity=8)
    cfg = EngineConfig(
        SchedulerConfig(max_batch=4, max_waiting=64, max_prefill_tokens=chunk), max_seq_len=96
    )
    return Engine(vm, IdTokenizer(), pool, cfg), store


@torch.no_grad()
def oracle(peft_model, adapter: Adapter | None, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] fp32 log-softmax of PEFT's VeRA (base model: b = 0)."""
    set_peft_vectors(peft_model, adapter)
    logits = peft_model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def assert_close(lp, want_row: torch.Tensor, token: int) -> None:
    """One TokenLogprobs against the oracle's log-softmax row of its position."""
    assert lp.token == token
    assert abs(lp.logprob - want_row[token].item()) < TOL
    top_v, top_i = want_row.topk(len(lp.top))
    assert [t for t, _ in lp.top] == top_i.tolist()
    assert max((abs(v - w) for (_, v), w in zip(lp.top, top_v.tolist())), default=0) < TOL


@pytest.mark.parametrize("kind,chunk", [("llama", 1024), ("llama", 5), ("gpt2", 7)])
def test_logprobs_equal_peft_log_softmax(make_tiny, tmp_path, kind, chunk) -> None:
    """Base and adapter rows in one batch, some scoring their prompts (over several prefill
    chunks when ``chunk`` is small), some not: every logprob and top-k set equals PEFT's."""
    base = make_tiny(kind)
    engine, store = engine_for(base, tmp_path, chunk)
    users = {f"u{i}": adapter_for(engine.vm, i) for i in range(2)}
    for uid, a in users.items():
        store.put(uid, a)
    g = torch.Generator().manual_seed(4)
    jobs = []
    for i, uid in enumerate([None, "u0", "u1", None, "u0"]):
        prompt = torch.randint(3, 120, (6 + 3 * i,), generator=g).tolist()
        scoring = K if i % 2 == 0 else None
        params = SamplingParams(max_new_tokens=4, logprobs=i % 4, prompt_logprobs=scoring)
        jobs.append((uid, prompt, params))
    engine.start()
    try:
        results = engine.generate(jobs)
    finally:
        engine.stop()
    peft_model = peft_vera(base, VeraConfig(r=8))
    for (uid, prompt, params), out in zip(jobs, results):
        assert len(out["token_ids"]) == 4 and len(out["logprobs"]) == 4
        want = oracle(peft_model, users.get(uid), prompt + out["token_ids"])
        for i, (token, lp) in enumerate(zip(out["token_ids"], out["logprobs"])):
            assert token == int(want[len(prompt) - 1 + i].argmax())  # greedy
            assert_close(lp, want[len(prompt) - 1 + i], token)
        if params.prompt_logprobs is None:
            assert out["prompt_logprobs"] is None
            continue
        scored = out["prompt_logprobs"]
        assert len(scored) == len(prompt) and scored[0] is None
        for j in range(1, len(prompt)):
            assert_close(scored[j], want[j - 1], prompt[j])


def test_scoring_only_prompts(make_tiny, tmp_path) -> None:
    """max_new_tokens 0: the prompt is scored, nothing is generated."""
    base = make_tiny("llama")
    engine, _ = engine_for(base, tmp_path, 4)
    prompts = [[5, 9, 11, 40, 7, 3, 90, 12, 15], [8, 8]]
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=1)
    engine.start()
    try:
        results = engine.generate([(None, p, params) for p in prompts])
    finally:
        engine.stop()
    peft_model = peft_vera(base, VeraConfig(r=8))
    for prompt, out in zip(prompts, results):
        assert out["token_ids"] == [] and out["finish_reason"] == "length"
        want = oracle(peft_model, None, prompt)
        got = out["prompt_logprobs"]
        assert got[0] is None and len(got) == len(prompt)
        for j in range(1, len(prompt)):
            assert_close(got[j], want[j - 1], prompt[j])


def test_min_tokens_and_stop_token_ids_in_the_engine(make_tiny, tmp_path) -> None:
    """A stop token made certain by logit_bias is held back for min_tokens, then ends the
    sequence without becoming output; the held tokens are the model's greedy choice."""
    from server.engine import InvalidTokens

    base = make_tiny("llama")
    engine, _ = engine_for(base, tmp_path, 1024)
    prompt = [5, 9, 11, 40]
    params = SamplingParams(
        max_new_tokens=8, logit_bias=((7, 100.0),), stop_token_ids=(7,), min_tokens=3, logprobs=1
    )
    with pytest.raises(InvalidTokens):
        engine.submit(None, prompt, SamplingParams(stop_token_ids=(10_000,)))
    engine.start()
    try:
        (out,) = engine.generate([(None, prompt, params)])
    finally:
        engine.stop()
    assert out["finish_reason"] == "stop" and len(out["token_ids"]) == 3
    want = oracle(peft_vera(base, VeraConfig(r=8)), None, prompt + out["token_ids"])
    for i, token in enumerate(out["token_ids"]):
        row = want[len(prompt) - 1 + i].clone()
        row[7] = float("-inf")
        assert token == int(row.argmax())

"""Penalties, logit_bias, min_tokens and stop_token_ids: each control's effect by its
formula, in the sampler (batched) and through the engine (against the model's own logits)."""

from __future__ import annotations

import torch

from server.engine.logits import apply_controls
from server.engine.sampler import NON_FINITE, sample_step
from server.engine.sampling_params import SamplingParams

VOCAB = 40


def naive(logits: torch.Tensor, p: SamplingParams, prompt: list[int], out: list[int], eos):
    """One row by the definitions, token by token (the oracle of the batched code)."""
    row = logits.clone()
    for t in set(prompt + out):
        if p.repetition_penalty != 1:
            row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(out):
        row[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
    for t, b in p.logit_bias:
        row[t] += b
    if len(out) < p.min_tokens:
        for t in (*eos, *p.stop_token_ids):
            row[t] = float("-inf")
    return row


def test_controls_match_their_definitions_row_by_row() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, VOCAB, generator=g) * 3
    params = [
        SamplingParams(),
        SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(logit_bias=((3, 100.0), (4, -100.0)), min_tokens=5, stop_token_ids=(9,)),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=2.0, logit_bias=((1, 5.0),)),
    ]
    prompts = [[1, 2, 3], [4, 4, 5], [6, 7, 7, 1], [2], [8, 8, 9]]
    outputs = [[1], [5, 5, 6, 11], [7, 12], [3, 3], [8, 1, 1, 1]]
    got = apply_controls(logits, params, prompts, outputs, eos_ids={2})
    for r in range(5):
        want = naive(logits[r], params[r], prompts[r], outputs[r], {2})
        assert torch.equal(torch.isinf(got[r]), torch.isinf(want))
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[r][finite], want[finite], atol=1e-5, rtol=0)
    assert torch.equal(got[0], logits[0])  # a row without controls is untouched


def test_logprobs_are_after_controls_before_temperature() -> None:
    """Frequency penalty moves the logprobs exactly by the formula; temperature does not."""
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1))
    out = [4, 4, 7]
    params = [
        SamplingParams(logprobs=5, frequency_penalty=1.5, temperature=0.3, seed=1),
        SamplingParams(logprobs=5),
    ]
    tokens, lps = sample_step(logits, params, [None, None], [[1], [1]], [out, []], set())
    shifted = logits[0].clone()
    shifted[4] -= 3.0
    shifted[7] -= 1.5
    want = torch.log_softmax(shifted, -1)
    assert abs(lps[0].logprob - want[tokens[0]].item()) < 1e-5
    assert [t for t, _ in lps[0].top] == want.topk(5).indices.tolist()
    raw = torch.log_softmax(logits[1], -1)
    assert lps[1].token == int(raw.argmax()) and abs(lps[1].logprob - raw.max().item()) < 1e-5


def test_logit_bias_forces_and_min_tokens_holds_stop() -> None:
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(2))
    forced = SamplingParams(logit_bias=((17, 100.0),), temperature=1.0)
    held = SamplingParams(logit_bias=((9, 100.0),), min_tokens=2, stop_token_ids=(9,))
    for n_out, want_held in ((0, False), (1, False), (2, True)):
        tokens, _ = sample_step(
            logits, [forced, held], [None, None], [[1]] * 2, [[5] * n_out] * 2, set()
        )
        assert tokens[0] == 17
        assert (tokens[1] == 9) == want_held


def test_mixed_batch_gives_each_row_its_tokens_alone() -> None:
    """Rows with and without controls sample as they would alone (greedy and seeded)."""
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(3))
    params = [
        SamplingParams(),
        SamplingParams(presence_penalty=2.0, temperature=0.9, seed=5, logprobs=2),
        SamplingParams(repetition_penalty=1.9, logit_bias=((0, -100.0),)),
        SamplingParams(frequency_penalty=-2.0, logprobs=0),
    ]
    prompts, outputs = [[1, 2]] * 4, [[int(logits[r].argmax()), 3, 3] for r in range(4)]

    def gens() -> list[torch.Generator | None]:
        return [torch.Generator().manual_seed(5) if p.seed is not None else None for p in params]

    together, lps = sample_step(logits, params, gens(), prompts, outputs, set())
    for r in range(4):
        alone, lp = sample_step(
            logits[r : r + 1], [params[r]], [gens()[r]], [prompts[r]], [outputs[r]], set()
        )
        assert alone == [together[r]]
        assert lp[0] == lps[r]


def test_a_non_finite_row_is_flagged_and_the_others_sample_as_alone() -> None:
    """NaN/Inf logits (not the controls' -inf bans) give that row NON_FINITE; the other rows,
    logprobs asked or not, get what they get without it."""
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(2))
    logits[1, 5] = float("nan")
    params = [
        SamplingParams(logprobs=2),
        SamplingParams(logprobs=2),
        SamplingParams(logit_bias=((3, -100.0),), min_tokens=2, stop_token_ids=(4,)),
    ]
    tokens, lps = sample_step(logits, params, [None] * 3, [[1]] * 3, [[]] * 3, {2})
    assert tokens[1] == NON_FINITE
    assert tokens[0] == int(logits[0].argmax()) and lps[0] is not None
    alone, _ = sample_step(logits[2:], params[2:], [None], [[1]], [[]], {2})
    assert tokens[2] == alone[0] != NON_FINITE  # its -inf bans are not "non-finite"

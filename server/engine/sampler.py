"""Batched sampling for one engine step: greedy, temperature, top-k, top-p and seeds per row,
the controls of ``logits.py`` (penalties, logit_bias, min_tokens), the rows' grammar masks
(``grammar.py``), and logprobs.

Every row's parameters become tensors and the whole batch is filtered and sampled with tensor
ops; the only host sync is the final ``tolist()`` of the chosen ids. Sampling uses the
exponential race: with ``E_i ~ Exp(1)`` independent, ``argmax_i p_i / E_i`` is distributed as
``Categorical(p)``, so a seeded row only needs its own noise vector from its own generator.

Logprobs are "processed" logprobs in vLLM's sense, before temperature: ``log_softmax`` of the
model's logits after the penalties and ``logit_bias`` of ``logits.py``, before temperature,
top-k and top-p; a row with a grammar has its disallowed tokens at -inf (its logprobs are
those of the distribution it samples from). With no controls set they are the model's own
log-probabilities (what scoring needs), whatever the temperature. Only the rows that ask pay
for them: one ``log_softmax`` and one ``topk`` over those rows.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from server.engine.logits import apply_controls
from server.engine.sampling_params import SamplingParams

NON_FINITE = -1  # sample_step's token for a row whose logits hold NaN/Inf


@dataclass(frozen=True)
class TokenLogprobs:
    """One token's log-probability and the ``k`` most likely tokens at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters as tensors on the logits' device."""

    temperature: torch.Tensor  # [batch] float, 0 = greedy
    top_p: torch.Tensor  # [batch] float in (0, 1]
    top_k: torch.Tensor  # [batch] long, 0 = off
    greedy: torch.Tensor  # [batch] bool
    generators: list[torch.Generator | None]  # per row; None = the global RNG
    all_greedy: bool  # known on the host: no device sync to skip the sampling path

    @classmethod
    def of(
        cls,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        device: torch.device,
    ) -> SamplingBatch:
        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperature=tensor([p.temperature for p in params], torch.float32),
            top_p=tensor([p.top_p for p in params], torch.float32),
            top_k=tensor([p.top_k for p in params], torch.long),
            greedy=tensor([p.greedy for p in params], torch.bool),
            generators=generators,
            all_greedy=all(p.greedy for p in params),
        )


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """logits: [batch, vocab] -> one token id per row (no controls, no logprobs)."""
    batch = SamplingBatch.of(params, generators, logits.device)
    return sample_tokens(logits.float(), batch).tolist()


def sample_step(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    prompts: Sequence[list[int]],
    outputs: Sequence[list[int]],
    eos_ids: Collection[int],
    grammar_bias: tuple[list[int], torch.Tensor] | None = None,
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits: [batch, vocab] -> (one token id per row, its logprobs where the row asked).
    ``prompts`` / ``outputs``: each row's tokens so far (for the controls). ``grammar_bias``:
    (rows, [len(rows), vocab] 0 / -inf), what those rows' grammars allow. A row whose logits
    hold NaN/Inf gets the token ``NON_FINITE``: the check rides on the one transfer of the
    tokens to the host instead of a sync of its own."""
    finite = torch.isfinite(logits).all(dim=-1)  # [batch], before the controls add -inf
    logits = apply_controls(logits.float(), params, prompts, outputs, eos_ids)
    if grammar_bias is not None:  # a new tensor: the runner's output stays as it is
        rows, bias = grammar_bias
        bias = bias.to(logits.device, non_blocking=True)
        if len(rows) == logits.shape[0]:  # rows are 0..batch-1, in order
            logits = logits + bias
        else:
            logits = logits.index_add(0, torch.tensor(rows, device=logits.device), bias)
    batch = SamplingBatch.of(params, generators, logits.device)
    tokens = sample_tokens(logits, batch)  # [batch]
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    found: list[TokenLogprobs | None] = [None] * len(params)
    if rows:
        ks = [params[i].logprobs or 0 for i in rows]
        idx = torch.tensor(rows, device=logits.device)
        for i, lp in zip(rows, token_logprobs(logits[idx], tokens[idx], ks)):
            found[i] = lp
    return torch.where(finite, tokens, NON_FINITE).tolist(), found


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, ks: list[int]
) -> list[TokenLogprobs]:
    """logits: [n, vocab] float32, tokens: [n] -> each token's log_softmax and the row's top
    ``ks[i]`` (one ``topk`` with the largest k, cut per row)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]  # [n]
    k = max(ks)
    top_v, top_i = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], tokens[:, None][:, :0])
    values, ids, picked = top_v.tolist(), top_i.tolist(), chosen.tolist()
    return [
        TokenLogprobs(int(t), lp, tuple(zip(ids[r][: ks[r]], values[r][: ks[r]])))
        for r, (t, lp) in enumerate(zip(tokens.tolist(), picked))
    ]


def sample_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits: [batch, vocab] float32 -> [batch] long token ids (no host sync)."""
    greedy_ids = logits.argmax(dim=-1)  # [batch]
    if batch.all_greedy:
        return greedy_ids
    temperature = torch.where(batch.greedy, 1.0, batch.temperature).clamp_min(1e-6)
    scaled = logits / temperature[:, None]
    ordered, order = torch.sort(scaled, dim=-1, descending=True)  # [batch, vocab]
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    vocab = logits.shape[-1]
    k = torch.where(batch.top_k > 0, batch.top_k, vocab)[:, None]
    ordered = ordered.masked_fill(ranks >= k, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    # drop a token when the tokens ranked before it already cover top_p (the first never)
    drop = probs.cumsum(dim=-1) - probs > batch.top_p[:, None]
    probs = torch.softmax(ordered.masked_fill(drop, float("-inf")), dim=-1)
    choice = (probs / _exponential_noise(probs, batch.generators)).argmax(dim=-1)  # [batch]
    sampled = order.gather(1, choice[:, None])[:, 0]
    return torch.where(batch.greedy, greedy_ids, sampled)


def _exponential_noise(
    probs: torch.Tensor, generators: list[torch.Generator | None]
) -> torch.Tensor:
    """[batch, vocab] Exp(1) draws; a row with a generator draws from it alone (seeded rows
    reproduce whatever else is in the batch)."""
    noise = torch.empty_like(probs).exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    return noise.clamp_min(1e-10)

"""Per-request sampling for one decode step: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

import torch

from server.sequence import SamplingParams


def _filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [vocab] (float32) -> scaled and filtered logits (-inf outside top-k/top-p)."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already cover top_p
        drop = probs.cumsum(-1) - probs > params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """logits: [batch, vocab] -> one token id per row."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for i, p in enumerate(params):
        if p.greedy:
            out.append(greedy[i])
            continue
        probs = torch.softmax(_filter_logits(logits[i].float(), p), dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=generators[i]).item()))
    return out

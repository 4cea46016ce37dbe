"""Token logprobs in each API's shape: OpenAI chat (``content``), OpenAI legacy completions
(``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``) and the native API.

The numbers are the engine's (``server/engine/sampler.py``): log-softmax of the model's logits
after penalties and ``logit_bias``, before temperature and top-p. Token strings are each
token decoded alone; ``text_offset`` is where each token's text starts in the answer's text
(decoded with a few tokens of left context, so a character split over tokens is counted once).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from server.engine.sampler import TokenLogprobs

_CONTEXT = 8  # tokens of left context when measuring one token's text


def token_text(tok: PreTrainedTokenizerBase, token: int) -> str:
    return str(tok.decode([token]))


def text_offsets(tok: PreTrainedTokenizerBase, ids: list[int], start: int = 0) -> list[int]:
    """Where each of ``ids``' text starts in ``decode(ids)``, plus ``start``."""
    offsets, at = [], start
    for i in range(len(ids)):
        offsets.append(at)
        left = ids[max(0, i - _CONTEXT) : i]
        at += len(tok.decode(left + [ids[i]])) - len(tok.decode(left))
    return offsets


def chat_content(tok: PreTrainedTokenizerBase, lps: list[TokenLogprobs]) -> list[dict[str, Any]]:
    """OpenAI chat: ``choices[i].logprobs.content``."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(tok, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [
        {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
        for lp in lps
    ]


def legacy(
    tok: PreTrainedTokenizerBase,
    ids: list[int],
    lps: list[TokenLogprobs | None],
    start: int = 0,
) -> dict[str, list[Any]]:
    """OpenAI legacy completions: one entry per token of ``ids`` (None where a token has no
    logprob: the first prompt token)."""
    tops: list[dict[str, float] | None] = []
    for lp in lps:
        tops.append(None if lp is None else {token_text(tok, t): v for t, v in lp.top})
    return {
        "tokens": [token_text(tok, t) for t in ids],
        "token_logprobs": [None if lp is None else lp.logprob for lp in lps],
        "top_logprobs": tops,
        "text_offset": text_offsets(tok, ids, start),
    }


def native(tok: PreTrainedTokenizerBase, lp: TokenLogprobs) -> dict[str, Any]:
    """The native API: one token's logprob and its top alternatives."""
    return {
        "logprob": lp.logprob,
        "top_logprobs": [
            {"token_id": t, "token": token_text(tok, t), "logprob": v} for t, v in lp.top
        ],
    }

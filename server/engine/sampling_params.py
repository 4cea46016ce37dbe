"""How one request samples: passed by keyword, validated once, frozen."""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20  # top alternatives per token a request may ask for
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """``logprobs``: None = off, k >= 0 = each sampled token's logprob and its top k
    alternatives; ``prompt_logprobs`` likewise for the prompt's tokens (scoring).

    Penalties (over the logits, before temperature; see ``server/engine/logits.py``):
    ``presence_penalty`` / ``frequency_penalty`` as OpenAI defines them (generated tokens),
    ``repetition_penalty`` as Hugging Face does (prompt and generated tokens, 1 = off),
    ``logit_bias`` token id -> added bias. ``min_tokens``: EOS and ``stop_token_ids`` are
    masked until that many tokens are out; ``stop_token_ids`` end the sequence like EOS.

    ``grammar``: llguidance grammar text the output must match (``grammar.json_schema_grammar``
    builds one from a JSON schema); the sequence ends when it is complete."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.max_new_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError("max_new_tokens 0 only scores the prompt: ask for prompt logprobs")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2]")
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError("repetition_penalty must be in (0, 2]")
        if any(abs(b) > MAX_LOGIT_BIAS for _, b in self.logit_bias):
            raise ValueError(
                f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
            )
        if self.min_tokens < 0 or self.min_tokens > max(self.max_new_tokens, 0):
            raise ValueError("min_tokens must be in [0, max_new_tokens]")
        if self.min_tokens and self.grammar is not None:
            raise ValueError("min_tokens cannot be combined with structured output")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Some control changes the logits (the sampler's slower path for this row)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
        )

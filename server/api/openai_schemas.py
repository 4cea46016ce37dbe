"""Request bodies of the OpenAI-compatible endpoints (unknown fields are accepted and ignored)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.api.schemas import StopField, stop_strings
from server.engine import SamplingParams

OPENAI_TEMPERATURE = 1.0  # what OpenAI samples with when a request gives none


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stop: StopField = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream_options: dict[str, Any] | None = None
    user: str | None = None

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=OPENAI_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=stop_strings(self.stop),
            seed=self.seed,
        )


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1, le=8192)

    @field_validator("prompt")
    @classmethod
    def _single(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request is supported")
        text = v if isinstance(v, str) else v[0]
        if not text:
            raise ValueError("prompt is empty")
        return v


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(pattern="^(system|developer|user|assistant)$")
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(None, ge=1, le=8192)

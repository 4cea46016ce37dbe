"""Request bodies of the OpenAI-compatible endpoints.

Every field of OpenAI's requests is either honoured or refused with a 400 that names it:
unknown fields are refused (``extra="forbid"``), and the known fields this server does not
implement are refused when they would change the answer (``_UNSUPPORTED``). Fields that change
nothing in the output (``user``, ``metadata``, ``store``, ``service_tier``, ...) are accepted.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from server.api.schemas import ResponseFormat, StopField, stop_strings
from server.api.tools import Tool, ToolChoice
from server.engine import SamplingParams
from server.engine.sampling_params import MAX_LOGPROBS

OPENAI_TEMPERATURE = 1.0  # what OpenAI samples with when a request gives none
MAX_PROMPTS = 64  # prompts (or n) per completions request
UNSUPPORTED = "unsupported_field"  # the error type errors.py answers with 400


def _none_or(*allowed: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or v in allowed


# field -> the values that do not change the answer (anything else is refused by name)
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "functions": lambda v: not v,
    "function_call": _none_or("none"),
    "audio": _none_or(),
    "prediction": _none_or(),
    "modalities": _none_or(["text"]),
    "reasoning_effort": _none_or(),
    "web_search_options": _none_or(),
    "verbosity": _none_or(),
    "suffix": _none_or(""),
}


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_PROMPTS)
    stream: bool = False
    stop: StopField = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=300)
    # vLLM's extensions, same names and meanings
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    response_format: ResponseFormat | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids, not {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], not {bias}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, harmless in _UNSUPPORTED.items():
                if name in data and not harmless(data[name]):
                    raise PydanticCustomError(
                        UNSUPPORTED,
                        "'{field}' is not supported by this server (value {value!r})",
                        {"field": name, "value": data[name]},
                    )
        return data

    def sampling_params(
        self, max_new_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        """Raises ValueError (a 400 at the route) for a combination no field checks alone."""
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=OPENAI_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            stop=stop_strings(self.stop),
            seed=self.seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items()),
            min_tokens=self.min_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            grammar=self.response_format.grammar() if self.response_format else None,
        )


class _Harmless(BaseModel):
    """OpenAI fields that change nothing in the answer, accepted (and ignored)."""

    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None  # prompts are not cached across requests here
    safety_identifier: str | None = None
    modalities: list[str] | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_OpenAIRequest):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0, le=8192)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_PROMPTS)

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of > 1:
            if self.best_of < (self.n or 1):
                raise ValueError("best_of must be >= n")
            if self.stream:
                raise ValueError("best_of > 1 cannot be streamed (the best are known at the end)")
        return self

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Prompt) -> Prompt:
        prompts = _split(v)
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("prompt is empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string, or token ids."""
        return _split(self.prompt)


def _split(v: Prompt) -> list[str | list[int]]:
    """One prompt (a string, or token ids) or several."""
    if isinstance(v, str) or (v and isinstance(v[0], int)):
        return [v]  # type: ignore[list-item]
    return list(v)  # type: ignore[arg-type]


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(pattern="^(system|developer|user|assistant|tool)$")
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it (a call's JSON arguments as a mapping)."""
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            out["tool_calls"] = [_template_call(c) for c in self.tool_calls]
        return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    if isinstance(fn.get("arguments"), str):
        with contextlib.suppress(ValueError):  # not JSON: the template gets the string
            fn["arguments"] = json.loads(fn["arguments"])
    return {**call, "function": fn}


class ChatCompletionRequest(_OpenAIRequest, _Harmless):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(None, ge=1, le=8192)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        forced = self.tools and self.tool_choice not in (None, "none", "auto")
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format and a forced tool_choice both constrain it")
        return self

"""Request and response bodies of the native API (OpenAI ones live in openai_schemas.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from adapters_store import USER_ID_PATTERN, validate_user_id
from server.engine import SamplingParams
from server.engine.grammar import json_schema_grammar
from server.engine.sampling_params import MAX_LOGPROBS

MAX_STOP = 8
MAX_STOP_CHARS = 128


def stop_strings(value: list[str] | str | None) -> tuple[str, ...]:
    stops = (value,) if isinstance(value, str) else tuple(value or ())
    if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"at most {MAX_STOP} stop strings of at most {MAX_STOP_CHARS} characters")
    return stops


# One string or a list (OpenAI accepts both); checked here, a tuple inside.
StopField = Annotated[
    list[str] | str | None,
    Field(description=f"up to {MAX_STOP} stop strings of up to {MAX_STOP_CHARS} characters"),
    AfterValidator(stop_strings),
]


# Validated once, here at the edge ('.' and '..' are refused by the validator); inside the
# server a user id is trusted.
UserIdField = Annotated[
    str,
    Field(pattern=f"^{USER_ID_PATTERN}$", description="letters, digits, '.', '_', '-'; 1-128"),
    AfterValidator(validate_user_id),
]


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entry: these status codes answer with an ``ErrorBody``."""
    return {code: {"model": ErrorBody} for code in codes}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


# OpenAI's rule for the names a request gives (a response format's schema, a function)
OPENAI_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=OPENAI_NAME_PATTERN)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the output always matches: strict or not


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' goes with type 'json_schema' (and only with it)")
        return self

    def grammar(self) -> str | None:
        """The grammar the output must match (None: free text); raises InvalidGrammar.
        ``strict``: as OpenAI defines it, an object has only the properties it lists (its
        ``additionalProperties`` is false unless the schema says otherwise)."""
        if self.type == "text":
            return None
        fmt = self.json_schema
        if fmt is None or fmt.json_schema is None:
            return json_schema_grammar(None)
        return json_schema_grammar(closed(fmt.json_schema) if fmt.strict else fmt.json_schema)


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that lists its
    properties and says nothing about others (nested ones too); the input is not changed."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(sub) for sub in out[key]]
    for key in _SCHEMA_ONE:
        if key in out:
            out[key] = closed(out[key])
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: UserIdField | None = Field(
        None, description="whose adapter to use; omit for the base model"
    )
    prompt: str | None = Field(None, max_length=200_000, description="raw text prompt")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, max_length=256, description="chat turns, rendered by the chat template"
    )
    max_new_tokens: int = Field(128, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=100_000, description="0 = off")
    stop: StopField = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="each token's logprob and its top k alternatives (log-softmax of the "
        "model's logits, before temperature)",
    )
    response_format: ResponseFormat | None = Field(
        None, description="OpenAI's shape: the output is JSON (matching a schema if given)"
    )

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=stop_strings(self.stop),
            seed=self.seed,
            logprobs=self.logprobs,
            grammar=self.response_format.grammar() if self.response_format else None,
        )

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.prompt is not None and not self.prompt:
            raise ValueError("'prompt' is empty")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    # prompt tokens whose K/V were copied (from a live prompt or the prefix cache), not computed
    cached_tokens: int = 0


class TopLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float


class TokenLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float
    top_logprobs: list[TopLogprob]


class GenerateResponse(BaseModel):
    user_id: str | None
    text: str
    finish_reason: str
    adapter_version: int | None
    usage: Usage
    timing: dict[str, float]
    logprobs: list[TokenLogprob] | None = None  # one per output token, when asked


class CreateUserRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: UserIdField
    rotate: bool = Field(False, description="issue a new key if the user exists")


class CreateUserResponse(BaseModel):
    user_id: str
    api_key: str


class AdapterUploaded(BaseModel):
    user_id: str
    version: int
    num_params: int
    bytes: int


class AdapterInfo(AdapterUploaded):
    sha256: str
    created_at: float
    base_fingerprint: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int


class ErrorBody(BaseModel):
    error: ErrorDetail

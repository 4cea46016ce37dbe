"""OpenAI-compatible /v1 endpoints: ``model`` is a user id, or the base model's name."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from transformers import PreTrainedTokenizerBase

from adapters_store import AdapterNotFound, validate_user_id
from server.api import logprob_shapes
from server.api.auth import Principal, principal, require_access
from server.api.deps import RuntimeDep
from server.api.engine_io import (
    STREAM_200,
    collect,
    collect_all,
    encode_prompt,
    raise_for_error,
    sse_stream,
    submit,
    submit_all,
)
from server.api.errors import ApiError
from server.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from server.api.schemas import error_responses
from server.api.streams import openai_closing
from server.engine import Event, SamplingParams
from server.engine.sampler import TokenLogprobs

if TYPE_CHECKING:
    from server.runtime import Runtime

router = APIRouter(prefix="/v1")
_ERRORS = error_responses(400, 401, 403, 404, 413, 422, 429, 503)
_CHAT_DEFAULT_MAX = 512


def _user_for_model(rt: Runtime, model: str, who: Principal) -> str | None:
    """``model`` is the base model's name (or "base") or a user id, validated here."""
    if model in (rt.model_name, "base"):
        return None
    require_access(who, validate_user_id(model))
    return model


def _usage(ev: Event) -> dict[str, int]:
    u = ev.usage or {"prompt_tokens": 0, "completion_tokens": 0}
    return {**u, "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}


def _finish(ev: Event) -> str:
    return "length" if ev.finish_reason == "length" else "stop"


@router.get("/models", responses=_ERRORS)
async def list_models(rt: RuntimeDep, who: Principal = Depends(principal)) -> dict[str, Any]:
    """The base model and the adapters the caller may use."""
    now = int(rt.engine.stats.started)
    data = [{"id": rt.model_name, "object": "model", "created": now, "owned_by": "vera-serve"}]
    if who.is_admin:
        metas = await asyncio.to_thread(rt.store.list)
    elif who.user_id is not None:
        try:
            metas = [await asyncio.to_thread(rt.adapters.describe, who.user_id)]
        except AdapterNotFound:
            metas = []
    data += [
        {
            "id": m.user_id,
            "object": "model",
            "created": int(m.created_at),
            "owned_by": m.user_id,
            "parent": rt.model_name,
        }
        for m in metas
    ]
    return {"object": "list", "data": data}


def _params(
    body: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    try:
        return body.sampling_params(max_tokens, logprobs, prompt_logprobs)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


@router.post("/completions", responses={**_ERRORS, **STREAM_200})
async def completions(
    body: CompletionRequest,
    request: Request,
    response: Response,
    rt: RuntimeDep,
    who: Principal = Depends(principal),
):
    """One choice per prompt (index order); ``echo`` puts the prompt (and with ``logprobs``
    its tokens' logprobs, the first None) before each choice's text; ``max_tokens`` 0 only
    scores the prompt."""
    user_id = _user_for_model(rt, body.model, who)
    prompts = body.prompts()
    if body.stream and len(prompts) > 1:
        raise ApiError(400, "'stream' with several prompts is not supported: send one prompt")
    ids = [encode_prompt(rt, p, None) if isinstance(p, str) else list(p) for p in prompts]
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    scoring = body.logprobs if body.echo and body.logprobs is not None else None
    if max_tokens == 0 and scoring is None:
        scoring = 0  # a prompt-only request runs as scoring (its numbers are not returned)
    params = _params(body, max_tokens, body.logprobs, scoring)
    admissions = await submit_all(rt, who, user_id, [(i, params) for i in ids])
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    tok = rt.tokenizer

    def echoed(i: int) -> str:
        return prompts[i] if isinstance(prompts[i], str) else tok.decode(ids[i])

    def body_of(choices: list[dict]) -> dict:
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
        }

    if body.stream:
        stream = CompletionStream(tok, ids[0], echoed(0) if body.echo else None, body.logprobs)

        def token(ev: Event) -> dict | None:
            choice = stream.token(ev)
            return None if choice is None else body_of([choice])

        def final(ev: Event) -> list[dict | str]:
            return _final_events(ev, body_of([stream.final(ev, _finish(ev))]), body)

        return StreamingResponse(
            sse_stream(admissions[0], token, final),
            media_type="text/event-stream",
            headers=admissions[0].headers,
        )
    response.headers.update(admissions[0].headers)
    outs = await collect_all(admissions, request)
    for out in outs:
        raise_for_error(out.final)
    choices = []
    for i, out in enumerate(outs):
        text, logprobs = out.text, None
        if body.echo:
            text = echoed(i) + text
        if body.logprobs is not None:
            out_ids = [ev.token_id for ev in out.tokens if ev.token_id is not None]
            out_lps = [ev.logprobs for ev in out.tokens]
            if body.echo:
                out_ids, out_lps = ids[i] + out_ids, (out.prompt_logprobs or []) + out_lps
            logprobs = logprob_shapes.legacy(tok, out_ids, out_lps)
        choices.append(
            {"index": i, "text": text, "logprobs": logprobs, "finish_reason": _finish(out.final)}
        )
    usage = [_usage(out.final) for out in outs]
    return {**body_of(choices), "usage": {k: sum(u[k] for u in usage) for k in usage[0]}}


class CompletionStream:
    """The choices of one streamed completion: each token's text (and logprobs when asked),
    the echoed prompt first; ``text_offset`` counts from the start of the streamed text."""

    def __init__(
        self,
        tok: PreTrainedTokenizerBase,
        prompt_ids: list[int],
        echo: str | None,
        logprobs: int | None,
    ) -> None:
        self.tok, self.prompt_ids, self.echo, self.logprobs = tok, prompt_ids, echo, logprobs
        self.offset = 0  # characters streamed so far

    def _prompt(self, ev: Event) -> tuple[str, dict | None]:
        """The echoed prompt, once (with its logprobs when they came with ``ev``)."""
        text, self.echo = self.echo or "", None
        shape = None
        if self.logprobs is not None and ev.prompt_logprobs is not None:
            shape = logprob_shapes.legacy(self.tok, self.prompt_ids, ev.prompt_logprobs)
        self.offset = len(text)
        return text, shape

    def token(self, ev: Event) -> dict | None:
        text, shape = self._prompt(ev) if self.echo is not None else ("", None)
        if self.logprobs is not None and ev.logprobs is not None:
            one = logprob_shapes.legacy(self.tok, [ev.logprobs.token], [ev.logprobs])
            one["text_offset"] = [self.offset]
            shape = one if shape is None else {k: shape[k] + one[k] for k in shape}
        self.offset += len(ev.text)
        text += ev.text
        if not text and shape is None:
            return None  # a token that completes no character yet
        return {"index": 0, "text": text, "logprobs": shape, "finish_reason": None}

    def final(self, ev: Event, finish: str) -> dict:
        text, shape = self._prompt(ev) if self.echo is not None else ("", None)
        return {"index": 0, "text": text + ev.text, "logprobs": shape, "finish_reason": finish}


@router.post("/chat/completions", responses={**_ERRORS, **STREAM_200})
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    rt: RuntimeDep,
    who: Principal = Depends(principal),
):
    user_id = _user_for_model(rt, body.model, who)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]
    ids = encode_prompt(rt, None, messages)
    limit = body.max_completion_tokens or body.max_tokens
    if limit is None:
        limit = max(1, min(_CHAT_DEFAULT_MAX, rt.engine.context_limit - len(ids)))
    k = (body.top_logprobs or 0) if body.logprobs else None
    admission = await submit(rt, who, user_id, ids, _params(body, limit, k))
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    tok = rt.tokenizer

    def logprobs(lps: list[TokenLogprobs | None]) -> dict | None:
        if k is None:
            return None
        return {
            "content": logprob_shapes.chat_content(tok, [lp for lp in lps if lp]),
            "refusal": None,
        }

    def chunk(delta: dict, finish: str | None, lps: list[TokenLogprobs | None]) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        if k is not None:
            choice["logprobs"] = logprobs(lps)
        return {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [choice],
        }

    if body.stream:
        first = [True]
        pending: list[TokenLogprobs | None] = []  # tokens not yet sent (no text yet)

        def token(ev: Event) -> dict | None:
            pending.append(ev.logprobs)
            if not ev.text:
                return None  # a token that completes no character yet
            delta = {"content": ev.text}
            if first[0]:
                delta["role"], first[0] = "assistant", False
            sent = chunk(delta, None, list(pending))
            pending.clear()
            return sent

        def final(ev: Event) -> list[dict | str]:
            delta = {"role": "assistant", "content": ""} if first[0] else {}
            if ev.text:
                delta["content"] = ev.text
            return _final_events(ev, chunk(delta, _finish(ev), pending), body)

        return StreamingResponse(
            sse_stream(admission, token, final),
            media_type="text/event-stream",
            headers=admission.headers,
        )
    response.headers.update(admission.headers)
    out = await collect(admission, request)
    raise_for_error(out.final)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": out.text},
                "finish_reason": _finish(out.final),
                "logprobs": logprobs([ev.logprobs for ev in out.tokens]),
            }
        ],
        "usage": _usage(out.final),
    }


def _final_events(ev: Event, last: dict, body: CompletionRequest | ChatCompletionRequest):
    """The closing events: ``last`` (with usage when the client asked for it), or, since the
    headers are already sent, an error event; then ``[DONE]``."""
    failed = ev.finish_reason == "error"
    include_usage = bool(body.stream_options and body.stream_options.get("include_usage"))
    return openai_closing(
        last,
        error=(ev.error or "generation failed") if failed else None,
        usage=_usage(ev) if include_usage else None,
    )

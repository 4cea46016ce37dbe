"""OpenAI-compatible /v1 endpoints: ``model`` is a user id, or the base model's name."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from adapters_store import AdapterNotFound, validate_user_id
from server.api.auth import Principal, principal, require_access
from server.api.deps import RuntimeDep
from server.api.engine_io import (
    STREAM_200,
    collect,
    encode_prompt,
    raise_for_error,
    sse_stream,
    submit,
)
from server.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from server.api.schemas import error_responses
from server.api.streams import openai_closing
from server.engine import Event

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


@router.post("/completions", responses={**_ERRORS, **STREAM_200})
async def completions(
    body: CompletionRequest,
    request: Request,
    response: Response,
    rt: RuntimeDep,
    who: Principal = Depends(principal),
):
    user_id = _user_for_model(rt, body.model, who)
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    ids = encode_prompt(rt, prompt, None)
    params = body.sampling_params(max_new_tokens=body.max_tokens or 16)
    admission = await submit(rt, who, user_id, ids, params)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str, finish: str | None) -> dict:
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        }

    if body.stream:

        def final(ev: Event) -> list[dict | str]:
            return _final_events(ev, chunk("", _finish(ev)), body)

        return StreamingResponse(
            sse_stream(admission, lambda ev: chunk(ev.text, None) if ev.text else None, final),
            media_type="text/event-stream",
            headers=admission.headers,
        )
    response.headers.update(admission.headers)
    out = await collect(admission, request)
    raise_for_error(out.final)
    return {**chunk(out.text, _finish(out.final)), "usage": _usage(out.final)}


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
    admission = await submit(rt, who, user_id, ids, body.sampling_params(max_new_tokens=limit))
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict, finish: str | None) -> dict:
        return {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    if body.stream:
        first = [True]

        def token(ev: Event) -> dict | None:
            if not ev.text:
                return None  # a token that completes no character yet
            delta = {"content": ev.text}
            if first[0]:
                delta["role"], first[0] = "assistant", False
            return chunk(delta, None)

        def final(ev: Event) -> list[dict | str]:
            delta = {"role": "assistant", "content": ""} if first[0] else {}
            return _final_events(ev, chunk(delta, _finish(ev)), body)

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
                "logprobs": None,
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

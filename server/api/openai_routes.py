"""OpenAI-compatible /v1 endpoints: ``model`` is a user id, or the base model's name."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from adapters_store import AdapterNotFound, validate_user_id
from server.api import logprob_shapes
from server.api.auth import Principal, principal, require_access
from server.api.deps import RuntimeDep
from server.api.engine_io import (
    STREAM_200,
    Admission,
    Outcome,
    collect_all,
    encode_prompt,
    raise_for_error,
    sse_choices,
    submit_all,
)
from server.api.errors import ApiError
from server.api.openai_choices import ChatChoice, CompletionChoice
from server.api.openai_schemas import MAX_PROMPTS, ChatCompletionRequest, CompletionRequest
from server.api.schemas import error_responses
from server.api.streams import StreamEvent, openai_closing
from server.api.tools import plan as plan_tools
from server.engine import Event, SamplingParams

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
    n: int | None = None,
) -> list[SamplingParams]:
    """The ``n`` (default: the body's) choices' parameters: with a ``seed``, choice j samples
    with ``seed + j``."""
    try:
        params = body.sampling_params(max_tokens, logprobs, prompt_logprobs)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    n = n or body.n or 1
    if n == 1 or params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + j) for j in range(n)]


def _usage_of(finals: list[Event], n: int) -> dict[str, Any]:
    """Each prompt counted once (its ``n`` choices share it), every choice's tokens; OpenAI's
    ``prompt_tokens_details.cached_tokens``: the prompt tokens not computed (copied from a
    live prompt or restored from the prefix cache), for each prompt's first choice."""
    usage = [ev.usage or {"prompt_tokens": 0, "completion_tokens": 0} for ev in finals]
    prompt = sum(u["prompt_tokens"] for u in usage[::n])
    completion = sum(u["completion_tokens"] for u in usage)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {
            "cached_tokens": sum(u.get("cached_tokens", 0) for u in usage[::n])
        },
    }


@router.post("/completions", responses={**_ERRORS, **STREAM_200})
async def completions(
    body: CompletionRequest,
    request: Request,
    response: Response,
    rt: RuntimeDep,
    who: Principal = Depends(principal),
):
    """One choice per prompt and per ``n`` (index ``prompt * n + j``), all admitted together;
    ``echo`` puts the prompt (and with ``logprobs`` its tokens' logprobs, the first None)
    before each choice's text; ``max_tokens`` 0 only scores the prompt. ``best_of``: that
    many candidates per prompt (sharing its prefill), the ``n`` with the highest total
    logprob returned, best first."""
    user_id = _user_for_model(rt, body.model, who)
    prompts, n = body.prompts(), max(body.n or 1, body.best_of or 1)
    if len(prompts) * n > MAX_PROMPTS:
        raise ApiError(400, f"prompts x n is {len(prompts) * n}, at most {MAX_PROMPTS}")
    ids = [encode_prompt(rt, p, None) if isinstance(p, str) else list(p) for p in prompts]
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    scoring = body.logprobs if body.echo and body.logprobs is not None else None
    if max_tokens == 0 and scoring is None:
        scoring = 0  # a prompt-only request runs as scoring (its numbers are not returned)
    ranking = n > (body.n or 1)  # best_of: rank candidates by their tokens' logprobs
    ranked_by = 0 if ranking and body.logprobs is None else body.logprobs
    params = _params(body, max_tokens, ranked_by, scoring, n)
    jobs = [(ids[c // n], params[c % n]) for c in range(len(prompts) * n)]
    admissions = await submit_all(rt, who, user_id, jobs)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    tok = rt.tokenizer

    def echoed(c: int) -> str:
        p = prompts[c // n]
        return p if isinstance(p, str) else str(tok.decode(ids[c // n]))

    def body_of(choices: list[dict]) -> dict:
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
        }

    if body.stream:
        choices = [
            CompletionChoice(c, tok, ids[c // n], echoed(c) if body.echo else None, body.logprobs)
            for c in range(len(jobs))
        ]

        def token(c: int, ev: Event) -> dict | None:
            choice = choices[c].token(ev)
            return None if choice is None else body_of([choice])

        def finish(c: int, ev: Event) -> dict:
            return body_of([choices[c].final(ev, _finish(ev))])

        return _streamed(admissions, token, finish, body, n)
    response.headers.update(admissions[0].headers)
    outs = await collect_all(admissions, request)
    for out in outs:
        raise_for_error(out.final)
    usage = _usage_of([out.final for out in outs], n)
    if ranking:  # from here on, n is the choices returned per prompt
        outs, n = _best(outs, n, body.n or 1), body.n or 1
    answer = []
    for c, out in enumerate(outs):
        text, logprobs = out.text, None
        if body.echo:
            text = echoed(c) + text
        if body.logprobs is not None:
            out_ids = [ev.token_id for ev in out.tokens if ev.token_id is not None]
            out_lps = [ev.logprobs for ev in out.tokens]
            if body.echo:
                out_ids, out_lps = ids[c // n] + out_ids, (out.prompt_logprobs or []) + out_lps
            logprobs = logprob_shapes.legacy(tok, out_ids, out_lps)
        answer.append(
            {"index": c, "text": text, "logprobs": logprobs, "finish_reason": _finish(out.final)}
        )
    return {**body_of(answer), "usage": usage}


def _best(outs: list[Outcome], candidates: int, n: int) -> list[Outcome]:
    """Of each prompt's ``candidates`` outcomes (in order), the ``n`` whose tokens' summed
    logprobs are highest, best first."""

    def total(out: Outcome) -> float:
        return sum(ev.logprobs.logprob for ev in out.tokens if ev.logprobs is not None)

    best = []
    for at in range(0, len(outs), candidates):
        best += sorted(outs[at : at + candidates], key=total, reverse=True)[:n]
    return best


@router.post("/chat/completions", responses={**_ERRORS, **STREAM_200})
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    rt: RuntimeDep,
    who: Principal = Depends(principal),
):
    user_id = _user_for_model(rt, body.model, who)
    messages = [m.for_template() for m in body.messages]
    tools = plan_tools(
        body.tools, body.tool_choice, body.parallel_tool_calls, rt.tokenizer, messages
    )
    ids = encode_prompt(rt, None, messages, tools.tools if tools else None)
    limit = body.max_completion_tokens or body.max_tokens
    if limit is None:
        limit = max(1, min(_CHAT_DEFAULT_MAX, rt.engine.context_limit - len(ids)))
    k = (body.top_logprobs or 0) if body.logprobs else None
    params = _params(body, limit, k)
    if tools is not None and tools.grammar is not None:
        try:
            params = [dataclasses.replace(p, grammar=tools.grammar) for p in params]
        except ValueError as e:  # e.g. min_tokens with a forced tool call
            raise ApiError(400, str(e)) from None
    called = tools is not None and tools.choice != "none"
    admissions = await submit_all(rt, who, user_id, [(ids, p) for p in params])
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    choices = [ChatChoice(c, rt.tokenizer, body.logprobs, called) for c in range(len(params))]

    def chunk(choice: dict) -> dict:
        return {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [choice],
        }

    def answer(text: str, ev: Event) -> tuple[dict[str, Any], str]:
        """The message and its finish reason; with tools, the output read as tool calls."""
        finish = _finish(ev)
        if tools is None or not called or finish == "length":
            return {"role": "assistant", "content": text}, finish
        try:
            content, calls = tools.read(text)
        except (ValueError, KeyError, TypeError) as e:  # a forced call always parses
            raise ApiError(500, f"the tool call did not parse: {e}", "server_error") from None
        if not calls:  # the answer as written
            return {"role": "assistant", "content": text}, finish
        return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"

    if body.stream:

        def token(c: int, ev: Event) -> dict | None:
            choice = choices[c].token(ev)
            return None if choice is None else chunk(choice)

        def finish(c: int, ev: Event) -> dict:
            if not called:
                return chunk(choices[c].final(_finish(ev)))
            message, reason = answer(choices[c].held, ev)
            return chunk(choices[c].final(reason, message))

        return _streamed(admissions, token, finish, body, len(params))
    response.headers.update(admissions[0].headers)
    outs = await collect_all(admissions, request)
    for out in outs:
        raise_for_error(out.final)
    answers = [answer(out.text, out.final) for out in outs]
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [
            {
                "index": c,
                "message": message,
                "finish_reason": reason,
                "logprobs": choices[c].content([ev.logprobs for ev in out.tokens if ev.logprobs]),
            }
            for c, (out, (message, reason)) in enumerate(zip(outs, answers))
        ],
        "usage": _usage_of([out.final for out in outs], len(params)),
    }


def _streamed(
    admissions: list[Admission],
    token: Callable[[int, Event], dict | None],
    finish: Callable[[int, Event], dict],
    body: CompletionRequest | ChatCompletionRequest,
    n: int,
) -> StreamingResponse:
    """The choices as one SSE stream, closed by the last choice's final chunk (with usage
    when the client asked for it) or, since the headers are already sent, an error event;
    then ``[DONE]``."""
    include_usage = bool(body.stream_options and body.stream_options.get("include_usage"))

    def closing(last: StreamEvent, finals: list[Event]) -> list[StreamEvent]:
        failed = [ev for ev in finals if ev.finish_reason == "error"]
        return openai_closing(
            last,  # type: ignore[arg-type]
            error=(failed[0].error or "generation failed") if failed else None,
            usage=_usage_of(finals, n) if include_usage else None,
        )

    return StreamingResponse(
        sse_choices(admissions, token, finish, closing),
        media_type="text/event-stream",
        headers=admissions[0].headers,
    )

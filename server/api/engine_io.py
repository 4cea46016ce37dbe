"""Requests into the engine, events out of it: prompt encoding, sampling parameters,
admission, and waiting for or streaming a sequence's events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from jinja2 import TemplateError

from adapters_store import AdapterNotFound
from server.api.errors import ApiError
from server.api.streams import StreamEvent, sse
from server.engine import Event, SamplingParams, Sequence
from server.engine.sampler import TokenLogprobs
from server.tenants import Permit

if TYPE_CHECKING:
    from server.api.auth import Principal
    from server.runtime import Runtime

_DISCONNECT_POLL_S = 0.5
# OpenAPI: with "stream": true the 200 is Server-Sent Events (each ``data:`` one JSON object,
# the OpenAI routes end with ``data: [DONE]``), not the JSON body.
_SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "required": ["data"],
}
STREAM_200: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON, or Server-Sent Events when the request sets stream=true",
        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
    }
}


def encode_prompt(
    rt: Runtime,
    prompt: str | None,
    messages: list[dict] | None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """``prompt`` tokenized, or ``messages`` (and ``tools``) rendered by the chat template."""
    tok = rt.tokenizer
    if messages is not None:
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, "this model has no chat template: send 'prompt' instead")
        try:
            ids = tok.apply_chat_template(
                messages,
                tools=tools or None,  # type: ignore[arg-type]
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        except TemplateError as e:  # e.g. a role or turn order the template refuses
            raise ApiError(400, f"the chat template cannot render these messages: {e}") from None
        return list(ids)  # type: ignore[arg-type]
    return list(tok(prompt, add_special_tokens=True)["input_ids"])


@dataclass
class Admission:
    """A request the engine took, and its hold on its user's rate limits (released when the
    response ends: ``collect`` and ``sse_stream`` do it)."""

    seq: Sequence
    permit: Permit

    @property
    def headers(self) -> dict[str, str]:
        """The rate-limit headers the response carries (none for a user without limits)."""
        return self.permit.headers


async def submit(
    rt: Runtime, who: Principal, user_id: str | None, ids: list[int], params: SamplingParams
) -> Admission:
    """Check the caller's rate limits, then queue on the engine, counted against the tenant
    ``who.client(user_id)``. Unknown adapter -> 404, or base model with --fallback-to-base."""
    (admission,) = await submit_all(rt, who, user_id, [(ids, params)])
    return admission


async def submit_all(
    rt: Runtime,
    who: Principal,
    user_id: str | None,
    requests: list[tuple[list[int], SamplingParams]],
) -> list[Admission]:
    """``submit`` for several prompts at once: each is rate-limited on its own, and the engine
    takes them together (one step admits them all) or none.

    In a worker thread: admission asks the store for the user's current version, and on a
    shared store counts the rate limits there (I/O that must not stall the event loop)."""
    loop = asyncio.get_running_loop()
    client = who.client(user_id)

    def admit() -> list[Admission]:
        permits: list[Permit] = []
        engine, key = rt.engine, who.key_id
        try:
            for ids, params in requests:
                permits.append(rt.tenants.limiter.admit(client, len(ids) + params.max_new_tokens))
            try:
                jobs = [(user_id, ids, params) for ids, params in requests]
                seqs = engine.submit_all(jobs, loop, client=client, key_id=key)
            except AdapterNotFound:
                if not rt.config.fallback_to_base or user_id is None:
                    raise
                jobs = [(None, ids, params) for ids, params in requests]
                seqs = engine.submit_all(jobs, loop, client=client, key_id=key)
        except BaseException:
            for permit in permits:
                permit.release()
            raise
        return [Admission(seq, permit) for seq, permit in zip(seqs, permits)]

    return await asyncio.to_thread(admit)


@dataclass
class Outcome:
    text: str
    final: Event
    tokens: list[Event]  # one per output token (its id, and its logprobs when asked)
    prompt_logprobs: list[TokenLogprobs | None] | None  # when the request scored its prompt


async def collect(admission: Admission, request: Request) -> Outcome:
    """Wait for the end; a client that goes away cancels the sequence (frees its KV row and
    its adapter slot). The connection is checked every ``_DISCONNECT_POLL_S`` whether or not
    tokens are arriving: a hang-up is noticed within that, not when generation ends."""
    seq = admission.seq
    pieces: list[str] = []
    tokens: list[Event] = []
    prompt_logprobs = None
    loop = asyncio.get_running_loop()
    next_check = loop.time() + _DISCONNECT_POLL_S
    try:
        while True:
            try:
                ev = await asyncio.wait_for(seq.channel.get(), timeout=_DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                ev = None
            if loop.time() >= next_check:
                next_check = loop.time() + _DISCONNECT_POLL_S
                if await request.is_disconnected():
                    seq.cancel()  # the engine ends it; its final event still comes
            if ev is None:
                continue
            if ev.prompt_logprobs is not None:
                prompt_logprobs = ev.prompt_logprobs
            if ev.finish_reason is not None:
                return Outcome("".join(pieces), ev, tokens, prompt_logprobs)
            pieces.append(ev.text)
            if ev.token_id is not None:
                tokens.append(ev)
    except asyncio.CancelledError:
        seq.cancel()
        raise
    finally:
        admission.permit.release()


async def collect_all(admissions: list[Admission], request: Request) -> list[Outcome]:
    """``collect`` each, concurrently; a failure (or this task's cancellation) cancels all."""
    tasks = [asyncio.ensure_future(collect(a, request)) for a in admissions]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        for a in admissions:
            a.seq.cancel()
            a.permit.release()  # idempotent; a task cancelled before it ran never did
        raise


def raise_for_error(ev: Event) -> None:
    if ev.finish_reason == "error":
        raise ApiError(
            503, ev.error or "generation failed", "generation_error", {"Retry-After": "1"}
        )


async def events(seq: Sequence) -> AsyncIterator[Event]:
    """Every event of ``seq``; cancels it if the consumer stops early (client disconnect)."""
    done = False
    try:
        while True:
            ev = await seq.channel.get()
            yield ev
            if ev.finish_reason is not None:
                done = True
                return
    finally:
        if not done:
            seq.cancel()


async def sse_choices(
    admissions: list[Admission],
    token: Callable[[int, Event], StreamEvent | None],
    finish: Callable[[int, Event], StreamEvent],
    closing: Callable[[StreamEvent, list[Event]], list[StreamEvent]],
) -> AsyncIterator[str]:
    """Several sequences (the choices of one request) as one SSE stream, events in the order
    they come: ``token(i, ev)`` per token of choice ``i``, ``finish(i, ev)`` when it ends
    (sent at once, except the last choice's, which ``closing(last, finals)`` turns into the
    stream's closing events)."""
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(i: int, seq: Sequence) -> None:
        async for ev in events(seq):
            queue.put_nowait((i, ev))

    tasks = [asyncio.ensure_future(pump(i, a.seq)) for i, a in enumerate(admissions)]
    finals: list[Event | None] = [None] * len(admissions)
    try:
        left = len(admissions)
        while left:
            i, ev = await queue.get()
            if ev.finish_reason is None:
                body = token(i, ev)
                if body is not None:
                    yield sse(body)
                continue
            finals[i], left = ev, left - 1
            if left:
                yield sse(finish(i, ev))
            else:
                ends = [f for f in finals if f is not None]
                for body in closing(finish(i, ev), ends):
                    yield sse(body)
    finally:
        for task in tasks:
            task.cancel()  # a consumer gone early: ``events`` cancels each sequence
        for a in admissions:
            a.permit.release()


async def sse_stream(
    admission: Admission,
    token: Callable[[Event], StreamEvent | None],
    final: Callable[[Event], list[StreamEvent]],
) -> AsyncIterator[str]:
    """The events of the admitted sequence as SSE: ``token(ev)`` per token (None: nothing to
    send yet), ``final(ev)`` at the end (``streams`` builds those for each API shape)."""
    try:
        async for ev in events(admission.seq):
            if ev.finish_reason is None:
                body = token(ev)
                if body is not None:
                    yield sse(body)
            else:
                for body in final(ev):
                    yield sse(body)
    finally:
        admission.permit.release()

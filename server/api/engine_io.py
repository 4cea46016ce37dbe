"""Requests into the engine, events out of it: prompt encoding, sampling parameters,
admission, and waiting for or streaming a sequence's events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request

from adapters_store import AdapterNotFound
from server.api.errors import ApiError
from server.api.streams import StreamEvent, sse
from server.engine import Event, SamplingParams, Sequence

if TYPE_CHECKING:
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


def encode_prompt(rt: Runtime, prompt: str | None, messages: list[dict] | None) -> list[int]:
    tok = rt.tokenizer
    if messages is not None:
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, "this model has no chat template: send 'prompt' instead")
        return list(
            tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    return list(tok(prompt, add_special_tokens=True)["input_ids"])


async def submit(
    rt: Runtime, user_id: str | None, ids: list[int], params: SamplingParams
) -> Sequence:
    """Queue on the engine; unknown adapter -> 404, or base model with --fallback-to-base.

    In a worker thread: admission asks the store for the user's current version (I/O that
    must not stall the event loop, least of all while the store is unreachable)."""
    loop = asyncio.get_running_loop()

    def admit() -> Sequence:
        try:
            return rt.engine.submit(user_id, ids, params, loop=loop)
        except AdapterNotFound:
            if not rt.config.fallback_to_base or user_id is None:
                raise
            return rt.engine.submit(None, ids, params, loop=loop)

    if user_id is None:
        return admit()
    return await asyncio.to_thread(admit)


@dataclass
class Outcome:
    text: str
    final: Event


async def collect(seq: Sequence, request: Request) -> Outcome:
    """Wait for the end; a client that goes away cancels the sequence (frees its KV row and
    its adapter slot). The connection is checked every ``_DISCONNECT_POLL_S`` whether or not
    tokens are arriving: a hang-up is noticed within that, not when generation ends."""
    pieces: list[str] = []
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
            if ev.finish_reason is not None:
                return Outcome("".join(pieces), ev)
            pieces.append(ev.text)
    except asyncio.CancelledError:
        seq.cancel()
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


async def sse_stream(
    seq: Sequence,
    token: Callable[[Event], StreamEvent | None],
    final: Callable[[Event], list[StreamEvent]],
) -> AsyncIterator[str]:
    """The events of ``seq`` as SSE: ``token(ev)`` per token (None: nothing to send yet),
    ``final(ev)`` at the end (``streams`` builds those for each API shape)."""
    async for ev in events(seq):
        if ev.finish_reason is None:
            body = token(ev)
            if body is not None:
                yield sse(body)
        else:
            for body in final(ev):
                yield sse(body)

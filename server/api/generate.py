"""POST /generate: one user's adapter, batched with everyone else's."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from server.api import logprob_shapes
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
from server.api.schemas import (
    GenerateRequest,
    GenerateResponse,
    TokenLogprob,
    Usage,
    error_responses,
)
from server.api.streams import StreamEvent, native_done
from server.engine import Event

router = APIRouter()
_ERRORS = error_responses(400, 401, 403, 404, 413, 422, 429, 503)
_ERRORS.update(STREAM_200)


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
async def generate(
    body: GenerateRequest,
    request: Request,
    response: Response,
    rt: RuntimeDep,
    who: Principal = Depends(principal),
):
    """Generate with ``user_id``'s adapter (or the base model). ``stream`` -> Server-Sent Events:
    one ``{"type": "token", "text", "token_id"}`` event per token, then a ``{"type": "done"}``
    event with finish_reason, usage and timing. ``logprobs: k``: each token (event) also
    carries ``logprob`` and ``top_logprobs`` (k alternatives)."""
    if body.user_id is not None:
        require_access(who, body.user_id)
    messages = [m.model_dump() for m in body.messages] if body.messages else None
    ids = encode_prompt(rt, body.prompt, messages)
    admission = await submit(rt, who, body.user_id, ids, body.sampling_params())
    seq = admission.seq
    version = seq.adapter_version if seq.user_id is not None else None

    def done(ev: Event) -> list[StreamEvent]:
        return [
            native_done(
                body.user_id,
                version,
                ev.finish_reason,
                usage=ev.usage,
                timing=ev.timing,
                error=ev.error,
            )
        ]

    def token(ev: Event) -> StreamEvent:
        event = {"type": "token", "text": ev.text, "token_id": ev.token_id}
        if ev.logprobs is not None:
            event.update(logprob_shapes.native(rt.tokenizer, ev.logprobs))
        return event

    if body.stream:
        stream = sse_stream(admission, token, done)
        headers = {"Cache-Control": "no-cache", **admission.headers}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    response.headers.update(admission.headers)
    out = await collect(admission, request)
    raise_for_error(out.final)
    return GenerateResponse(
        user_id=body.user_id,
        text=out.text,
        finish_reason=out.final.finish_reason or "stop",
        adapter_version=version,
        usage=Usage.model_validate(out.final.usage),
        timing=out.final.timing or {},
        logprobs=None
        if body.logprobs is None
        else [
            TokenLogprob(
                token_id=ev.logprobs.token,
                token=logprob_shapes.token_text(rt.tokenizer, ev.logprobs.token),
                **logprob_shapes.native(rt.tokenizer, ev.logprobs),
            )
            for ev in out.tokens
            if ev.logprobs is not None
        ],
    )

"""Server-Sent Events, and what a stream says at its end in each API's shape (one place each).

* Native ``/generate``: one ``{"type": "done", ...}`` event with finish_reason, usage and timing
  (and ``error`` when the request failed).
* OpenAI ``/v1/*``: the last chunk (with ``usage`` when the client asked for it) or, when the
  request failed after the headers were sent, ``{"error": {...}}``; then ``[DONE]``.

The cluster gateway ends a stream whose replica was lost with the same events.
"""

from __future__ import annotations

import json
from typing import Any

StreamEvent = dict[str, Any] | str  # a JSON object, or a literal such as "[DONE]"


def sse(payload: StreamEvent) -> str:
    """One event: ``data: <JSON or literal>`` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def native_done(
    user_id: str | None,
    adapter_version: int | None,
    finish_reason: str | None,
    *,
    usage: dict[str, int] | None = None,
    timing: dict[str, float] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The closing event of a ``/generate`` stream."""
    return {
        "type": "done",
        "user_id": user_id,
        "finish_reason": finish_reason,
        "adapter_version": adapter_version,
        "usage": usage,
        "timing": timing,
        **({"error": error} if error else {}),
    }


def openai_closing(
    last: dict[str, Any],
    *,
    error: str | None = None,
    kind: str = "generation_error",
    usage: dict[str, int] | None = None,
) -> list[StreamEvent]:
    """The closing events of an OpenAI stream: ``last`` (the final chunk, with ``usage`` if
    given) or, when ``error`` is set, an error object instead; then ``[DONE]``."""
    if error is not None:
        return [{"error": {"message": error, "type": kind, "code": 503}}, "[DONE]"]
    if usage is not None:
        last = {**last, "usage": usage}
    return [last, "[DONE]"]


def lost_stream_events(path: str, user_id: str | None, message: str) -> str:
    """How a stream of ``path`` ends when whatever produced it failed mid-way."""
    if path.startswith("/v1/"):
        events = openai_closing({}, error=message, kind="replica_unavailable")
    else:
        events = [native_done(user_id, None, "error", error=message)]
    return "".join(sse(e) for e in events)

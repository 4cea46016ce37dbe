"""What travels between the gateway and an engine replica, and the replay of a request into
the replica's own FastAPI app.

The gateway sends one ``HttpRequest`` (the raw HTTP request: method, path, query, headers,
body). The replica runs it through its ASGI app in-process and streams back a
``ResponseHead`` (status, headers and the first body chunk), then zero or more ``bytes``
chunks. Every route, auth rule and error body is therefore the single server's, unchanged.

Guarantees of ``replay``:

* The head comes with the first body chunk, so a non-streaming response (one chunk) arrives
  whole in one item, and a caller that fails before the head can still answer with a status.
* Body chunks already queued are coalesced into one item (fewer messages under load); an SSE
  event is never split, since the app sends whole events.
* When the consumer stops early (client gone, or cancellation), the app sees
  ``http.disconnect`` and its task is cancelled, then awaited (up to ``WIND_DOWN_S``): the
  engine cancels the sequence and frees its KV rows, as for a client that hangs up on
  ``vera-serve serve``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

Headers = tuple[tuple[bytes, bytes], ...]
AsgiApp = Callable[[Any, Any, Any], Awaitable[None]]  # (scope, receive, send)

_END = object()  # sentinel after the app returns
WIND_DOWN_S = 5.0  # how long an abandoned request's app task may take to stop


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    query: bytes
    headers: Headers
    body: bytes
    client: tuple[str, int] | None = None

    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": self.query,
            "root_path": "",
            "headers": [list(h) for h in self.headers],
            "client": self.client,
            "server": None,
        }

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


@dataclass(frozen=True)
class ResponseHead:
    status: int
    headers: Headers
    body: bytes  # the first chunk

    @property
    def is_event_stream(self) -> bool:
        return any(
            k.lower() == b"content-type" and v.startswith(b"text/event-stream")
            for k, v in self.headers
        )


async def replay(app: AsgiApp, request: HttpRequest) -> AsyncIterator[ResponseHead | bytes]:
    """Run ``request`` through ``app``; yield its ``ResponseHead``, then its body chunks."""
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_read = False

    async def receive() -> dict:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(request.scope(), receive, messages.put)
        finally:
            messages.put_nowait(_END)

    task = asyncio.create_task(run())
    answered = False
    try:
        start: dict | None = None
        while True:
            message = await messages.get()
            if message is _END:
                break
            if message["type"] == "http.response.start":
                start = message
                continue
            chunk, more = _drain(message, messages)
            if start is not None:
                yield ResponseHead(start["status"], _headers(start), chunk)
                start, answered = None, True
            elif chunk:
                yield chunk
            if not more:
                break
        try:
            await task
        except Exception:
            # Starlette re-raises an unhandled error after sending its 500 (already logged
            # by the app's handler); only an app that answered nothing is the caller's problem.
            if not answered:
                raise
        if not answered:
            raise RuntimeError("the app returned without a response")
    finally:
        gone.set()
        await _stop(task)


async def _stop(task: asyncio.Task) -> None:
    """Cancel the app's task until it ends (its handlers cancel the sequence), at most
    ``WIND_DOWN_S``. Once is not enough on Python 3.11: ``asyncio.wait_for`` (the app's
    ``collect`` waits for each token in one) drops a cancellation that lands as its inner wait
    completes, which tokens arriving every step make likely (fixed in Python 3.12)."""
    deadline = asyncio.get_running_loop().time() + WIND_DOWN_S
    while not task.done() and asyncio.get_running_loop().time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)


def _drain(first: dict, messages: asyncio.Queue) -> tuple[bytes, bool]:
    """``first``'s body plus every body message already queued; and whether more follow."""
    parts, more = [first.get("body", b"")], first.get("more_body", False)
    while more and not messages.empty():
        nxt = messages.get_nowait()
        if nxt is _END:
            messages.put_nowait(_END)
            break
        parts.append(nxt.get("body", b""))
        more = nxt.get("more_body", False)
    return b"".join(parts), more


def _headers(start: dict) -> Headers:
    return tuple((bytes(k), bytes(v)) for k, v in start.get("headers", ()))

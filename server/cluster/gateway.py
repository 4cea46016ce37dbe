"""The cluster's HTTP ingress: behind Ray Serve's proxy, it forwards every request to an engine
replica and streams the answer back; it answers the cluster-wide views itself.

* Forwarding: the raw request (``forwarding.HttpRequest``) goes to ``EngineReplica.forward``
  through a streaming ``DeploymentHandle`` whose ``multiplexed_model_id`` is the request's
  ``routing.routing_key``; the replica replays it into its own FastAPI app, so routes, auth
  and error bodies are those of ``vera-serve serve``. The body limit is the server's own
  ``BodyLimit`` middleware, applied here before the body is buffered.
* A replica that fails before answering -> ``503`` in the server's error shape. One that dies
  mid-stream -> the stream ends with the route's error event (``/generate``: a ``done`` event
  with ``finish_reason: "error"``; ``/v1/*``: ``{"error": {...}}`` then ``[DONE]``). Nothing
  is retried: a request may have had effects on the replica that died.
* ``GET /health``: 200 while at least one replica reports a live engine, else 503.
  ``GET /metrics``: every replica's samples, labelled ``replica``. ``GET /admin/stats`` is
  forwarded first (the replica checks the admin token); a 200 is replaced by the cluster view.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.api.app import BodyLimit
from server.api.errors import error_response
from server.api.streams import lost_stream_events
from server.cluster.aggregate import cluster_metrics, cluster_stats
from server.cluster.forwarding import HttpRequest, ResponseHead
from server.cluster.routing import routing_key
from server.cluster.stats_board import ReplicaReport

log = logging.getLogger("vera-serve")


class GatewayApp:
    """The gateway as a plain ASGI app (Ray Serve hosts it in the ``Gateway`` deployment)."""

    def __init__(self, engines: DeploymentHandle, board: DeploymentHandle) -> None:
        self.engines = engines.options(stream=True)
        self.board = board

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        request = Request(scope, receive)
        route = (request.method, request.url.path)
        if route == ("GET", "/health"):
            response = await self.health()
        elif route == ("GET", "/metrics"):
            metrics = cluster_metrics(await self.reports())
            response = Response(metrics, media_type=CONTENT_TYPE_LATEST)
        else:
            response = await self.forward(request)
        await response(scope, receive, send)

    async def reports(self) -> list[ReplicaReport]:
        try:
            return await self.board.snapshot.remote()
        except Exception as e:  # the board is restarting: no replica to vouch for
            log.warning("stats board unavailable: %r", e)
            return []

    async def health(self) -> Response:
        healthy = [r for r in await self.reports() if r.healthy]
        if not healthy:
            return error_response(503, "no engine replica is running", "unavailable")
        model = healthy[0].stats.get("model")
        return JSONResponse({"status": "ok", "model": model, "replicas": len(healthy)})

    async def forward(self, request: Request) -> Response:
        try:
            body = await request.body()
        except ClientDisconnect:
            return error_response(400, "client disconnected mid-request", "client_disconnected")
        forwarded = HttpRequest(
            method=request.method,
            path=request.url.path,
            query=request.scope.get("query_string", b""),
            headers=tuple((bytes(k), bytes(v)) for k, v in request.scope["headers"]),
            body=body,
            client=tuple(request.scope["client"]) if request.scope.get("client") else None,
        )
        stream = self.engines.options(multiplexed_model_id=routing_key(forwarded)).forward
        replies = cast(DeploymentResponseGenerator, stream.remote(forwarded))  # stream=True
        head = await _head(replies, request.receive)
        if not isinstance(head, ResponseHead):
            replies.cancel()  # stop the request upstream: the sequence frees its KV rows
            if isinstance(head, Exception):
                log.warning(
                    "%s %s: no answer from a replica: %r", request.method, forwarded.path, head
                )
            return error_response(
                503, "no engine replica could answer", "replica_unavailable", {"Retry-After": "1"}
            )
        if forwarded.path == "/admin/stats" and head.status == 200:
            replies.cancel()  # the replica accepted the admin token; answer for the cluster
            return JSONResponse(cluster_stats(await self.reports()))
        response = StreamingResponse(_relay(head, replies, forwarded), status_code=head.status)
        response.raw_headers = list(head.headers)
        return response


async def _head(
    replies: DeploymentResponseGenerator, receive: Any
) -> ResponseHead | Exception | None:
    """The replica's response head; its error if it failed first; None if the client hung up
    first. Watched here because in Ray Serve's throughput-optimized mode (the launcher's
    default) the proxy does not cancel a request whose client leaves before the answer starts:
    the replica would generate the whole answer for nobody."""
    head = asyncio.ensure_future(replies.__anext__())
    gone = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({head, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this task is cancelled (a proxy saw the client go)
        gone.cancel()
        if not head.done():
            head.cancel()
            replies.cancel()
    if head.cancelled():
        return None
    error = head.exception()
    if error is None:
        return head.result()
    if isinstance(error, Exception):
        return error
    raise error


async def _disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _relay(
    head: ResponseHead, replies: DeploymentResponseGenerator, request: HttpRequest
) -> AsyncIterator[bytes]:
    """The head's body, then the replica's chunks; a replica lost mid-stream becomes the
    route's closing error event (SSE) or a short body (the status is already sent)."""
    finished = False
    try:
        yield head.body
        async for chunk in replies:
            yield chunk
        finished = True
    except Exception as e:
        log.warning("%s %s: replica lost mid-response: %r", request.method, request.path, e)
        if head.is_event_stream:
            yield stream_error_events(request, "the engine replica serving this stream failed")
    finally:
        if not finished:
            replies.cancel()  # client gone (or replica lost): stop the sequence, free its KV


def stream_error_events(request: HttpRequest, message: str) -> bytes:
    """The SSE events a route ends a failed stream with, as ``vera-serve serve`` sends them."""
    try:
        user_id = json.loads(request.body).get("user_id")
    except (ValueError, AttributeError):
        user_id = None
    return lost_stream_events(request.path, user_id, message).encode()


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Gateway:
    def __init__(self, engines: DeploymentHandle, board: DeploymentHandle, body_limit: int):
        self.asgi = BodyLimit(GatewayApp(engines, board), limit=body_limit)

    def __serve_build_asgi_app__(self) -> Any:
        return self.asgi

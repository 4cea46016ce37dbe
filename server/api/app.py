"""The FastAPI application: routes, error bodies, body-size limit, engine lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from server.api import (
    adapters,
    admin,
    console,
    errors,
    fine_tuning,
    generate,
    history,
    metrics,
    openai_routes,
    tenants,
    usage,
)
from server.api.errors import error_response
from server.auth import KeyCache

if TYPE_CHECKING:
    from server.runtime import Runtime


class BodyLimit:
    """Pure ASGI middleware: refuse bodies over ``limit`` bytes with 413, declared or not."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: dict, receive: Any, send: Any) -> None:
        response = error_response(
            413, f"request body exceeds the {self.limit} byte limit", "payload_too_large"
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(runtime: Runtime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        app.state.history.start()
        try:
            yield
        finally:
            app.state.history.stop()
            runtime.shutdown()  # drains in-flight sequences first

    app = FastAPI(
        title="vera-serve",
        version="0.1.0",
        description="Multi-tenant personalized LLM serving with VeRA adapters.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.keys = KeyCache(runtime.users)
    app.state.metrics_registry = metrics.make_registry(runtime)
    app.state.history = history.StatsHistory(partial(admin.collect_stats, runtime))
    errors.install(app)
    routers = (generate, adapters, admin, tenants, usage, history, console)
    for module in (*routers, openai_routes, fine_tuning, metrics):
        app.include_router(module.router)
    app.add_middleware(BodyLimit, limit=runtime.config.max_body_bytes)
    return app

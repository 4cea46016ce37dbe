"""Every error leaves as ``{"error": {"message", "type", "code"}}`` with a 4xx/5xx status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from adapters_store import (
    AdapterNotFound,
    InvalidUserId,
    StoreError,
    StoreUnavailable,
)
from server.auth import UserExists
from server.engine import (
    ContextTooLong,
    EngineStopped,
    InvalidGrammar,
    InvalidTokens,
    QueueFull,
)
from server.finetune.service import FineTuneForbidden, FineTuneInvalid, FineTuneNotFound
from server.finetune.store import JobLimit
from server.tenants import RateLimited
from vera_core.errors import VeraError
from vera_core.train_data import TrainingDataError

log = logging.getLogger("vera-serve")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def error_response(status: int, message: str, kind: str, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


_MAPPING: list[tuple[type[Exception], int, str]] = [
    (InvalidUserId, 400, "invalid_user_id"),
    (AdapterNotFound, 404, "adapter_not_found"),
    (StoreUnavailable, 503, "store_unavailable"),
    (UserExists, 409, "conflict"),
    (JobLimit, 429, "job_limit"),
    (StoreError, 500, "store_error"),
    (TrainingDataError, 400, "invalid_training_file"),
    (VeraError, 400, "invalid_adapter"),
    (ContextTooLong, 400, "context_length_exceeded"),
    (InvalidTokens, 400, "invalid_request_error"),
    (InvalidGrammar, 400, "invalid_request_error"),
    (QueueFull, 429, "queue_full"),
    (RateLimited, 429, "rate_limit_exceeded"),
    (EngineStopped, 503, "shutting_down"),
    (FineTuneInvalid, 400, "invalid_request_error"),
    (FineTuneNotFound, 404, "not_found"),
    (FineTuneForbidden, 403, "forbidden"),
]


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request"


def _refused_fields(exc: RequestValidationError) -> str | None:
    """The message naming the unknown or unsupported fields of a request, if it has any."""
    unknown, unsupported = [], []
    for err in exc.errors():
        if err.get("type") == "extra_forbidden":
            unknown.append(".".join(str(x) for x in err.get("loc", ()) if x != "body"))
        elif err.get("type") == "unsupported_field":
            unsupported.append(str(err.get("msg")))
    if unknown:
        return f"unknown field(s): {', '.join(unknown)}"
    return "; ".join(unsupported) or None


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind, exc.headers)

    # Starlette's base class, not FastAPI's subclass: routing 404/405 and FastAPI's own
    # "error parsing the body" 400 are raised as the base class and would otherwise leave as
    # {"detail": ...}, breaking the one error shape the schema declares.
    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "http_error", exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        refused = _refused_fields(exc)
        if refused:  # a field the server does not know or does not implement: 400
            return error_response(400, refused, "invalid_request_error")
        return error_response(422, _validation_message(exc), "validation_error")

    for exc_type, status, kind in _MAPPING:
        app.add_exception_handler(exc_type, _make_handler(status, kind))

    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client hung up mid-body (e.g. during an upload): nothing was stored and no one
        # is left to read a reply. Not a server fault, so no "unhandled error" traceback.
        log.info("client disconnected before its request body was read")
        return error_response(400, "client disconnected mid-request", "client_disconnected")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")


def _make_handler(status: int, kind: str):
    async def handler(_: Request, exc: Exception) -> JSONResponse:
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        if isinstance(exc, RateLimited):  # OpenAI's x-ratelimit-* and its own Retry-After
            headers = exc.headers
        return error_response(status, str(exc), kind, headers)

    return handler

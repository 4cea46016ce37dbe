"""PUT/GET/DELETE /users/{user_id}/adapter: a user's vectors, servable at once."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import AfterValidator

from adapters_store import USER_ID_PATTERN, validate_user_id
from server.api.auth import Principal, principal, require_access
from server.api.deps import RuntimeDep
from server.api.schemas import AdapterInfo, AdapterUploaded, error_responses
from server.api.uploads import parse_upload

router = APIRouter()
# The edge's validation of a user id (the pattern, and never '.' or '..'); inside, trusted.
UserId = Annotated[
    str,
    Path(pattern=f"^{USER_ID_PATTERN}$", description="letters, digits, '.', '_', '-'; 1-128"),
    AfterValidator(validate_user_id),
]
_ERRORS = error_responses(400, 401, 403, 404, 413, 415, 422, 503)


# The body is read raw (it is a file, not JSON); declare it so clients and fuzzers see it.
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": _BINARY, "application/zip": _BINARY},
    }
}


@router.put(
    "/users/{user_id}/adapter",
    status_code=201,
    response_model=AdapterUploaded,
    responses=_ERRORS,
    openapi_extra=_UPLOAD_BODY,
)
async def put_adapter(
    user_id: UserId, request: Request, rt: RuntimeDep, who: Principal = Depends(principal)
):
    """Body: a vera-serve adapter file (``application/octet-stream``) or a PEFT VeRA adapter
    directory as a zip (``application/zip``). Validated before anything is stored; once this
    answers 201, every replica sharing the store serves the new version."""
    require_access(who, user_id)
    data = await request.body()
    content_type = request.headers.get("content-type", "")

    def work():
        adapter = parse_upload(content_type, data, rt.vm.projections, rt.config.max_body_bytes)
        return rt.adapters.publish(user_id, adapter)

    meta = await asyncio.to_thread(work)
    return AdapterUploaded(
        user_id=user_id, version=meta.version, num_params=meta.num_params, bytes=meta.bytes
    )


@router.get("/users/{user_id}/adapter", response_model=AdapterInfo, responses=_ERRORS)
async def get_adapter(user_id: UserId, rt: RuntimeDep, who: Principal = Depends(principal)):
    require_access(who, user_id)
    meta = await asyncio.to_thread(rt.adapters.describe, user_id)
    return AdapterInfo(**meta.to_dict())


@router.delete("/users/{user_id}/adapter", status_code=204, responses=_ERRORS)
async def delete_adapter(user_id: UserId, rt: RuntimeDep, who: Principal = Depends(principal)):
    require_access(who, user_id)
    await asyncio.to_thread(rt.adapters.delete, user_id)
    return Response(status_code=204)

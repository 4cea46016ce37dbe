"""GET /v1/organization/usage/completions: usage in OpenAI's shape, per time bucket.

The admin token sees every user (``user_ids`` narrows it); a user key sees its own usage only.
Results may be grouped by ``user_id``, ``api_key_id`` and ``model`` (the base model's name or
``<user>@v<version>``); each carries OpenAI's fields (``input_tokens``, ``output_tokens``,
``num_model_requests``) and this server's own (``training_tokens``, ``engine_seconds``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query

from server.api.auth import Principal, principal
from server.api.deps import RuntimeDep
from server.api.errors import ApiError
from server.api.schemas import error_responses
from server.tenants.usage import WIDTHS

router = APIRouter()
_ERRORS = error_responses(400, 401, 403, 422, 503)
_DEFAULT_LIMIT = {"1m": 60, "1h": 24, "1d": 7}  # OpenAI's defaults
_MAX_LIMIT = {"1m": 1440, "1h": 168, "1d": 31}
MAX_TIME = 2**40  # unix seconds: far beyond any bucket, and fits a database integer


@router.get("/v1/organization/usage/completions", responses=_ERRORS)
async def usage_completions(
    rt: RuntimeDep,
    start_time: Annotated[int, Query(ge=0, le=MAX_TIME, description="unix seconds, inclusive")],
    end_time: Annotated[
        int | None, Query(ge=0, le=MAX_TIME, description="unix seconds, exclusive")
    ] = None,
    bucket_width: Literal["1m", "1h", "1d"] = "1d",
    group_by: Annotated[list[Literal["user_id", "api_key_id", "model"]] | None, Query()] = None,
    user_ids: Annotated[list[str] | None, Query()] = None,
    limit: Annotated[int | None, Query(ge=1, le=1440)] = None,
    page: Annotated[str | None, Query(description="next_page of the previous answer")] = None,
    who: Principal = Depends(principal),
) -> dict[str, Any]:
    if who.is_admin:
        users = tuple(user_ids or ())
    else:
        if user_ids and set(user_ids) != {who.user_id}:
            raise ApiError(403, "a user key sees only its own usage", "forbidden")
        users = (who.user_id or "",)
    width = WIDTHS[bucket_width]
    count = limit or _DEFAULT_LIMIT[bucket_width]
    if count > _MAX_LIMIT[bucket_width]:
        raise ApiError(400, f"limit must be at most {_MAX_LIMIT[bucket_width]} for {bucket_width}")
    start = start_time
    if page is not None:
        if not page.isdigit() or not start_time <= int(page) <= MAX_TIME:
            raise ApiError(400, "page is not a next_page this endpoint gave")
        start = int(page)
    end = end_time if end_time is not None else int(time.time()) + 1
    if end <= start_time:
        raise ApiError(400, "end_time must be after start_time")
    stop = min(end, start - start % width + count * width)
    buckets = await asyncio.to_thread(
        rt.tenants.usage.query, start, stop, bucket_width, tuple(group_by or ()), users
    )
    more = stop < end
    return {
        "object": "page",
        "data": buckets,
        "has_more": more,
        "next_page": str(stop) if more else None,
    }

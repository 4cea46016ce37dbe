"""Admin endpoints for tenants: who is sharing the engine now, and each user's limits."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from server.api.adapters import UserId
from server.api.auth import Principal, principal, require_admin
from server.api.deps import RuntimeDep
from server.api.schemas import error_responses
from server.runtime import Runtime
from server.tenants import Limits

router = APIRouter()
_ERRORS = error_responses(400, 401, 403, 422, 503)
MAX_LIMIT = 10**12  # any limit above is "unlimited" in practice (and fits a database integer)


class LimitsBody(BaseModel):
    """A user's overrides; a field left out or null follows the server's default (0 =
    unlimited)."""

    model_config = ConfigDict(extra="forbid")
    weight: float | None = Field(None, gt=0, le=1000, description="fair share (tier); 1 = default")
    requests_per_minute: int | None = Field(None, ge=0, le=MAX_LIMIT)
    tokens_per_minute: int | None = Field(None, ge=0, le=MAX_LIMIT, description="prompt + max")
    max_concurrent: int | None = Field(None, ge=0, le=MAX_LIMIT, description="in flight at once")
    max_queued: int | None = Field(None, ge=0, le=MAX_LIMIT, description="waiting in the queue")


def _limits(rt: Runtime, user_id: str) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "override": asdict(rt.tenants.limits.override(user_id)),
        "effective": asdict(rt.tenants.limits.effective(user_id)),
    }


@router.get("/admin/tenants/{user_id}/limits", responses=_ERRORS)
async def get_limits(
    user_id: UserId, rt: RuntimeDep, who: Principal = Depends(principal)
) -> dict[str, Any]:
    require_admin(who)
    return await asyncio.to_thread(_limits, rt, user_id)


@router.put("/admin/tenants/{user_id}/limits", responses=_ERRORS)
async def put_limits(
    user_id: UserId, body: LimitsBody, rt: RuntimeDep, who: Principal = Depends(principal)
) -> dict[str, Any]:
    """Replace the user's overrides (every replica applies them within seconds)."""
    require_admin(who)
    limits = Limits(**body.model_dump())

    def work() -> dict[str, Any]:
        rt.tenants.limits.set(user_id, limits)
        return _limits(rt, user_id)

    return await asyncio.to_thread(work)


@router.get("/admin/tenants", responses=_ERRORS)
async def tenants(rt: RuntimeDep, who: Principal = Depends(principal)) -> dict[str, Any]:
    """The fair-share view: per user its virtual token counter, weight, running and waiting
    requests, limits, and usage over the last hour; the users with overrides too."""
    require_admin(who)
    return await asyncio.to_thread(tenant_view, rt)


def tenant_view(rt: Runtime) -> dict[str, Any]:
    now = int(time.time())
    hour = rt.tenants.usage.query(now - 3600, now + 1, "1h", ("user_id",))
    used: dict[str, dict[str, int]] = {}
    for bucket in hour:
        for r in bucket["results"]:
            u = used.setdefault(
                r["user_id"], {"requests": 0, "input_tokens": 0, "output_tokens": 0}
            )
            u["requests"] += r["num_model_requests"]
            u["input_tokens"] += r["input_tokens"]
            u["output_tokens"] += r["output_tokens"]
    live = rt.engine.scheduler.tenants()
    overrides = rt.tenants.limits.overrides()
    rows = []
    for user in sorted(set(live) | set(overrides) | set(used)):
        state = live.get(user, {"counter": 0.0, "running": 0, "waiting": 0})
        rows.append(
            {
                "user_id": user,
                "counter": state["counter"],
                "running": state["running"],
                "waiting": state["waiting"],
                "limits": asdict(rt.tenants.limits.effective(user)),
                "overridden": user in overrides,
                "last_hour": used.get(user, {"requests": 0, "input_tokens": 0, "output_tokens": 0}),
            }
        )
    config = rt.config
    return {
        "scheduling": config.scheduling,
        "weights": {"input": config.fair_input_weight, "output": config.fair_output_weight},
        "preemptions": rt.engine.stats.preemptions,
        "tenants": rows,
    }

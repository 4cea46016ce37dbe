"""Admin endpoints (admin token only) and the open health check."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends

from server.api.auth import Principal, principal, require_admin
from server.api.deps import RuntimeDep
from server.api.errors import ApiError
from server.api.schemas import CreateUserRequest, CreateUserResponse, error_responses

if TYPE_CHECKING:
    from server.runtime import Runtime

router = APIRouter()
_ERRORS = error_responses(400, 401, 403, 409, 422, 503)


@router.post("/admin/users", status_code=201, response_model=CreateUserResponse, responses=_ERRORS)
async def create_user(body: CreateUserRequest, rt: RuntimeDep, who: Principal = Depends(principal)):
    """Register a user and return its API key (shown once; only a hash is kept)."""
    require_admin(who)
    key = await asyncio.to_thread(rt.users.create, body.user_id, body.rotate)
    return CreateUserResponse(user_id=body.user_id, api_key=key)


@router.get("/admin/stats", responses=_ERRORS)
async def stats(rt: RuntimeDep, who: Principal = Depends(principal)) -> dict[str, Any]:
    """Memory, adapter tiers and slots, queue, batch, throughput and latency percentiles."""
    require_admin(who)
    return await asyncio.to_thread(collect_stats, rt)


def collect_stats(rt: Runtime) -> dict[str, Any]:
    engine = rt.engine
    pool = rt.pool.stats()
    return {
        "model": rt.model_name,
        "device": str(rt.config.torch_device),
        "dtype": str(rt.config.torch_dtype).removeprefix("torch."),
        "store": {"location": rt.storage.description, "reachable": pool["disk"]["reachable"]},
        "memory": rt.memory(),
        "heap": rt.heap.stats(),
        "adapters": {
            "stored": pool["disk"]["adapters"],
            "num_params_per_adapter": rt.vm.layout.num_params,
            **pool,
        },
        "engine": {
            "queue_depth": engine.queue_depth(),
            "running_batch": engine.running(),
            "kv_cache_bytes": engine.kv_cache_bytes(),
            "decode": engine.decode_mode(),
            "tokens_per_s": engine.stats.tokens_per_s(),
            "requests_submitted": engine.stats.submitted,
            "completion_tokens": engine.stats.completion_tokens,
            "finish_reasons": dict(engine.stats.finish_reasons),
            "ttft_ms": engine.stats.ttft.percentiles(),
            "latency_ms": engine.stats.latency.percentiles(),
            "scheduling": rt.config.scheduling,
            "preemptions": engine.stats.preemptions,
            "shared_prompts": engine.scheduler.forked,
            "shared_prompt_tokens": engine.scheduler.shared_tokens,
            "prefix_cache": engine.scheduler.prefixes.stats(),
            "rate_limited_requests": rt.tenants.limiter.refused,
        },
        "fine_tuning": {
            "current_job": rt.fine_tuning.worker.current,
            "training_units": engine.background.units,
            "training_seconds": round(engine.background.seconds, 3),
            "train_share_while_serving": rt.config.train_share,
        },
    }


@router.get("/health")
async def health(rt: RuntimeDep) -> dict[str, Any]:
    if not rt.engine.alive:
        raise ApiError(503, "engine is not running", "unavailable")
    return {"status": "ok", "model": rt.model_name}

"""OpenAI-compatible files and fine-tuning jobs, and the native ``/users/{id}/adapter/train``.

A job trains one user's VeRA vectors inside the server on the resident base model; when it
succeeds the adapter is published like an upload and ``fine_tuned_model`` is the user id, usable
at once as ``model`` in ``/v1/chat/completions`` and as ``user_id`` in ``/generate``. The official
``openai`` client works unchanged (``client.files.create``, ``client.fine_tuning.jobs.*``).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from server.api.adapters import UserId
from server.api.auth import Principal, principal, require_access
from server.api.deps import RuntimeDep
from server.api.errors import ApiError
from server.api.schemas import error_responses
from server.finetune.records import FileRecord, JobEvent, JobRecord
from server.finetune.service import FineTuneInvalid, FineTuningService

router = APIRouter()
_ERRORS = error_responses(400, 401, 403, 404, 413, 422, 429, 503)


def _caller(who: Principal) -> str | None:
    """The user a request acts as; None for the admin token (and dev mode)."""
    return None if who.is_admin else who.user_id


def _fine_tuning(rt: RuntimeDep) -> FineTuningService:
    return rt.fine_tuning


Service = Annotated[FineTuningService, Depends(_fine_tuning)]


# -- objects as OpenAI shapes them -----------------------------------------------------------
def file_object(f: FileRecord) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def job_object(j: JobRecord) -> dict[str, Any]:
    result = j.result or {}
    hp = result.get("hyperparameters", j.hyperparameters)
    hyperparameters = {k: hp.get(k, "auto") for k in ("n_epochs", "batch_size")}
    hyperparameters["learning_rate_multiplier"] = hp.get("learning_rate_multiplier", "auto")
    return {
        "id": j.id,
        "object": "fine_tuning.job",
        "created_at": j.created_at,
        "finished_at": j.finished_at,
        "model": j.model,
        "fine_tuned_model": j.fine_tuned_model,
        "organization_id": "vera-serve",
        "status": j.status,
        "training_file": j.training_file,
        "validation_file": j.validation_file,
        "hyperparameters": hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "result_files": [],
        "trained_tokens": j.trained_tokens,
        "error": j.error,
        "seed": 0,
        "estimated_finish": None,
        "integrations": [],
        "user_provided_suffix": j.suffix,
        # vera-serve's own fields: whose adapter, and what training did
        "user_id": j.user_id,
        "adapter_version": result.get("adapter_version"),
        "training_report": {k: v for k, v in result.items() if k != "hyperparameters"} or None,
    }


def event_object(e: JobEvent) -> dict[str, Any]:
    return {
        "id": e.id,
        "object": "fine_tuning.job.event",
        "created_at": e.created_at,
        "level": e.level,
        "message": e.message,
        "type": e.type,
        "data": e.data,
    }


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more}


# -- files -----------------------------------------------------------------------------------
@router.post("/v1/files", responses=_ERRORS)
async def upload_file(
    service: Service,
    file: UploadFile = File(..., description="JSONL: one chat or prompt/completion per line"),
    purpose: str = Form(..., description="'fine-tune'"),
    who: Principal = Depends(principal),
) -> dict[str, Any]:
    """Upload a training file. Every line is checked now; a bad one is named in a 400."""
    limit = service.config.limits.max_bytes
    content = await file.read(limit + 1)
    if len(content) > limit:
        raise ApiError(413, f"the file exceeds the {limit} byte limit", "payload_too_large")
    record = await asyncio.to_thread(
        service.upload, _caller(who), file.filename or "", purpose, content
    )
    return file_object(record)


@router.get("/v1/files", responses=_ERRORS)
async def list_files(
    service: Service, purpose: str | None = None, who: Principal = Depends(principal)
) -> dict[str, Any]:
    records = await asyncio.to_thread(service.files, _caller(who), purpose)
    return _page([file_object(f) for f in records], False)


@router.get("/v1/files/{file_id}", responses=_ERRORS)
async def get_file(
    file_id: str, service: Service, who: Principal = Depends(principal)
) -> dict[str, Any]:
    return file_object(await asyncio.to_thread(service.file, _caller(who), file_id))


@router.delete("/v1/files/{file_id}", responses=_ERRORS)
async def delete_file(
    file_id: str, service: Service, who: Principal = Depends(principal)
) -> dict[str, Any]:
    await asyncio.to_thread(service.delete_file, _caller(who), file_id)
    return {"id": file_id, "object": "file", "deleted": True}


# -- jobs ------------------------------------------------------------------------------------
class _Supervised(BaseModel):
    hyperparameters: dict[str, Any] | None = None


class _Method(BaseModel):
    type: Literal["supervised"]
    supervised: _Supervised | None = None


class CreateJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="the base model's name (see GET /v1/models)")
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any] | None = Field(
        None, description="n_epochs, batch_size, learning_rate_multiplier: a value or 'auto'"
    )
    method: _Method | None = None
    suffix: str | None = Field(
        None, max_length=128, description="admin token: the user whose adapter to train"
    )


@router.post("/v1/fine_tuning/jobs", responses=_ERRORS)
async def create_job(
    body: CreateJobRequest, service: Service, who: Principal = Depends(principal)
) -> dict[str, Any]:
    """Queue a job that trains the caller's adapter (admin: the user named by ``suffix``)."""
    hp = body.hyperparameters
    if body.method is not None and body.method.supervised is not None:
        if hp is not None and body.method.supervised.hyperparameters is not None:
            raise FineTuneInvalid("give hyperparameters once: top level or in method.supervised")
        hp = hp or body.method.supervised.hyperparameters
    job = await asyncio.to_thread(
        service.create_job,
        _caller(who),
        body.model,
        body.training_file,
        body.validation_file,
        hp,
        body.suffix,
    )
    return job_object(job)


@router.get("/v1/fine_tuning/jobs", responses=_ERRORS)
async def list_jobs(
    service: Service,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    who: Principal = Depends(principal),
) -> dict[str, Any]:
    jobs, more = await asyncio.to_thread(service.jobs, _caller(who), after, limit)
    return _page([job_object(j) for j in jobs], more)


@router.get("/v1/fine_tuning/jobs/{job_id}", responses=_ERRORS)
async def get_job(
    job_id: str, service: Service, who: Principal = Depends(principal)
) -> dict[str, Any]:
    return job_object(await asyncio.to_thread(service.job, _caller(who), job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", responses=_ERRORS)
async def cancel_job(
    job_id: str, service: Service, who: Principal = Depends(principal)
) -> dict[str, Any]:
    """A queued job is cancelled at once; a running one stops at its next training unit."""
    return job_object(await asyncio.to_thread(service.cancel, _caller(who), job_id))


@router.get("/v1/fine_tuning/jobs/{job_id}/events", responses=_ERRORS)
async def job_events(
    job_id: str,
    service: Service,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=1000),
    who: Principal = Depends(principal),
) -> dict[str, Any]:
    """Progress, per-step training loss (``type: metrics``) and the outcome; newest first."""
    events, more = await asyncio.to_thread(service.events, _caller(who), job_id, after, limit)
    return _page([event_object(e) for e in events], more)


# -- native shortcut -------------------------------------------------------------------------
# The body is the JSONL file itself, read raw (any content type); declared as bytes.
_JSONL_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "/users/{user_id}/adapter/train",
    status_code=202,
    responses=_ERRORS,
    openapi_extra=_JSONL_BODY,
)
async def train_adapter(
    user_id: UserId,
    request: Request,
    service: Service,
    n_epochs: int | None = Query(None, ge=1, le=50),
    batch_size: int | None = Query(None, ge=1, le=64),
    learning_rate_multiplier: float | None = Query(None, gt=0, le=20),
    who: Principal = Depends(principal),
) -> dict[str, Any]:
    """Body: the training JSONL itself. Stores it as a file and queues a job training
    ``user_id``'s adapter; answers the job (poll ``/v1/fine_tuning/jobs/{id}``)."""
    require_access(who, user_id)
    limit = service.config.limits.max_bytes
    content = await request.body()
    if len(content) > limit:
        raise ApiError(413, f"the file exceeds the {limit} byte limit", "payload_too_large")
    caller = _caller(who)
    given = {
        "n_epochs": n_epochs,
        "batch_size": batch_size,
        "learning_rate_multiplier": learning_rate_multiplier,
    }
    hp = {k: v for k, v in given.items() if v is not None}

    def work() -> JobRecord:
        record = service.upload(caller, f"{user_id}-train.jsonl", "fine-tune", content)
        return service.create_job(
            caller, service.base_model, record.id, None, hp, None if caller else user_id
        )

    return job_object(await asyncio.to_thread(work))

"""Files and fine-tuning jobs as the API sees them: who may see what, validation, limits.

A caller is a user id, or ``None`` for the admin token (and dev mode). Users see, use and cancel
only their own files and jobs (another user's: ``FineTuneForbidden``, 403); the admin sees all.
Files the admin uploads belong to ``ADMIN_OWNER``, which no user id can equal. A job trains the
caller's own adapter; with the admin token the user is named by ``suffix``. All methods block
(store I/O, tokenizing): call them from a worker thread.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from adapters_store import AdapterNotFound, validate_user_id
from server.finetune.records import FileRecord, JobEvent, JobRecord
from server.finetune.store import JobStore
from server.finetune.worker import FineTuneConfig, JobWorker
from vera_core.train_data import TrainingDataError, read_examples

ADMIN_OWNER = "*admin"
PURPOSE = "fine-tune"
_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")


class FineTuneNotFound(LookupError):
    """No such file or job (404)."""


class FineTuneForbidden(PermissionError):
    """The file or job belongs to another user (403)."""


class FineTuneInvalid(ValueError):
    """A request that cannot be honoured as sent (400)."""


class FineTuningService:
    def __init__(
        self,
        store: JobStore,
        tokenizer: PreTrainedTokenizerBase,
        base_model: str,
        config: FineTuneConfig,
        worker: JobWorker,
    ) -> None:
        self.store, self.tokenizer, self.base_model = store, tokenizer, base_model
        self.config, self.worker = config, worker

    # -- files ------------------------------------------------------------------------------
    def upload(self, caller: str | None, filename: str, purpose: str, content: bytes) -> FileRecord:
        """Store a training file after checking every line (TrainingDataError names the first
        bad one) and that every example fits the limits once tokenized."""
        if purpose != PURPOSE:
            raise FineTuneInvalid(f"purpose {purpose!r} is not supported; use {PURPOSE!r}")
        limits = self.config.limits
        read_examples(content, self.tokenizer, limits)
        return self.store.put_file(_owner(caller), filename or "upload.jsonl", purpose, content)

    def file(self, caller: str | None, file_id: str) -> FileRecord:
        record = self.store.get_file(file_id)
        if record is None:
            raise FineTuneNotFound(f"no file {file_id!r}")
        _check_owner(caller, record.user_id, "file")
        return record

    def files(self, caller: str | None, purpose: str | None) -> list[FileRecord]:
        return self.store.list_files(caller, purpose)  # None (admin): every owner's

    def delete_file(self, caller: str | None, file_id: str) -> None:
        self.file(caller, file_id)
        if not self.store.delete_file(file_id):
            raise FineTuneNotFound(f"no file {file_id!r}")

    # -- jobs -------------------------------------------------------------------------------
    def create_job(
        self,
        caller: str | None,
        model: str,
        training_file: str,
        validation_file: str | None = None,
        hyperparameters: dict[str, Any] | None = None,
        suffix: str | None = None,
    ) -> JobRecord:
        user_id = _job_user(caller, suffix)
        if model == user_id:  # the user's fine-tuned model: continue from its adapter
            try:
                self.worker.adapters.describe(user_id)
            except AdapterNotFound:
                raise FineTuneInvalid(
                    f"model {model!r} is the user's fine-tuned model, but the user has no "
                    f"adapter yet; fine-tune the base model {self.base_model!r} first"
                ) from None
        elif model != self.base_model:
            raise FineTuneInvalid(
                f"model {model!r} cannot be fine-tuned here; use the base model "
                f"{self.base_model!r} (a new adapter) or {user_id!r}, the user's fine-tuned "
                "model (continues from its adapter)"
            )
        for file_id in (training_file, validation_file):
            if file_id is not None:
                record = self.file(caller, file_id)
                if record.purpose != PURPOSE:
                    raise FineTuneInvalid(f"file {file_id!r} has purpose {record.purpose!r}")
        hp = validate_hyperparameters(hyperparameters or {})
        job = self.store.create_job(
            user_id,
            model,
            training_file,
            validation_file,
            hp,
            suffix,
            max_queued=self.config.max_queued_jobs,
            max_active_per_user=self.config.max_active_per_user,
        )
        self.store.add_event(job.id, f"Fine-tuning job created for user {user_id}.")
        self.worker.wake()
        return job

    def job(self, caller: str | None, job_id: str) -> JobRecord:
        record = self.store.get_job(job_id)
        if record is None:
            raise FineTuneNotFound(f"no fine-tuning job {job_id!r}")
        _check_owner(caller, record.user_id, "fine-tuning job")
        return record

    def jobs(
        self, caller: str | None, after: str | None, limit: int
    ) -> tuple[list[JobRecord], bool]:
        if after is not None:
            self.job(caller, after)  # paging from another user's job would leak its position
        return self.store.list_jobs(caller, after=after, limit=limit)

    def cancel(self, caller: str | None, job_id: str) -> JobRecord:
        self.job(caller, job_id)
        record = self.store.request_cancel(job_id)
        if record is None:
            raise FineTuneNotFound(f"no fine-tuning job {job_id!r}")
        if record.status == "cancelled":
            self.store.add_event(job_id, "The job was cancelled before it started.")
        else:
            self.worker.cancel(job_id)
        return self.store.get_job(job_id) or record

    def events(
        self, caller: str | None, job_id: str, after: str | None, limit: int
    ) -> tuple[list[JobEvent], bool]:
        self.job(caller, job_id)
        return self.store.list_events(job_id, after=after, limit=limit)


def validate_hyperparameters(hp: dict[str, Any]) -> dict[str, Any]:
    """``n_epochs`` 1..50, ``batch_size`` 1..64, ``learning_rate_multiplier`` (0, 20], each a
    number or "auto" (the default); unknown names are refused."""
    unknown = sorted(set(hp) - set(_HYPERPARAMETERS))
    if unknown:
        raise FineTuneInvalid(
            f"unknown hyperparameters {unknown}; supported: {', '.join(_HYPERPARAMETERS)}"
        )
    out: dict[str, Any] = {}
    bounds = {"n_epochs": (1, 50), "batch_size": (1, 64), "learning_rate_multiplier": (0, 20)}
    for name in _HYPERPARAMETERS:
        value = hp.get(name, "auto")
        if value != "auto":
            low, high = bounds[name]
            integral = name != "learning_rate_multiplier"
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok and integral:
                ok = float(value).is_integer()
            if not ok or not (low < value <= high if not integral else low <= value <= high):
                kind = "an integer" if integral else "a number"
                raise FineTuneInvalid(
                    f"hyperparameters.{name} must be 'auto' or {kind} in "
                    f"{'[' if integral else '('}{low}, {high}]"
                )
            value = int(value) if integral else float(value)
        out[name] = value
    return out


def _owner(caller: str | None) -> str:
    return ADMIN_OWNER if caller is None else caller


def _check_owner(caller: str | None, owner: str, what: str) -> None:
    if caller is not None and owner != caller:
        raise FineTuneForbidden(f"this {what} belongs to another user")


def _job_user(caller: str | None, suffix: str | None) -> str:
    """The user whose adapter a job trains."""
    if caller is None:
        if not suffix:
            raise FineTuneInvalid(
                "with the admin token, name the user whose adapter to train in 'suffix'"
            )
        return validate_user_id(suffix)
    if suffix and suffix != caller:
        raise FineTuneForbidden(
            "a user key trains only its own adapter (suffix must be empty or the key's user id)"
        )
    return caller


__all__ = [
    "ADMIN_OWNER",
    "FineTuneForbidden",
    "FineTuneInvalid",
    "FineTuneNotFound",
    "FineTuningService",
    "TrainingDataError",
]

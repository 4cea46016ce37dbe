"""Runs fine-tuning jobs inside the server, one at a time, on the model that is serving.

The worker thread claims the oldest queued job from the job store (any replica sharing the
store may claim it; a job whose worker stopped heartbeating is claimed again and restarts), reads
and tokenizes its file, and trains the user's vectors with ``AdapterTrainer``. Every
forward/backward unit runs on the engine thread through ``Engine.run_background``: training never
overlaps a serving forward, runs flat out while the server is idle and takes a bounded share of
the time while requests are in flight. The trained adapter is published through
``AdapterService`` (the same path as an upload: validated, versioned, visible at once).

Job state lives only in the store: events and heartbeats are written as training goes, a cancel
is seen within one heartbeat, and a server that stops hands its running job back to the queue.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from adapters_store import StoreUnavailable
from server.adapter_service import AdapterService
from server.engine import Engine, EngineStopped
from server.finetune.records import JobRecord
from server.finetune.store import JobStore
from vera_core.inject import VeraModel
from vera_core.train import AdapterTrainer, StepReport, TrainConfig
from vera_core.train_data import IGNORE, DataLimits, Example, TrainingDataError, read_examples

log = logging.getLogger(__name__)

MAX_STEP_EVENTS = 200  # per job; longer jobs report every k-th step


@dataclass(frozen=True)
class FineTuneConfig:
    limits: DataLimits
    max_queued_jobs: int = 16  # jobs not yet finished, whole store; beyond: 429
    max_active_per_user: int = 1  # a user's second job while one is queued/running: 429
    unit_tokens_idle: int = 2048  # padded tokens per training unit while nothing is served
    unit_tokens_serving: int = 128  # ... while requests are in flight: each unit stalls them
    heartbeat_s: float = 2.0
    stale_s: float = 30.0  # a running job without a heartbeat this long is claimed again
    max_attempts: int = 3  # claims of one job before it fails as interrupted
    poll_s: float = 1.0  # how often an idle worker looks for jobs queued by other replicas


class _Stop(Exception):
    """The job left this worker (cancelled, handed back, or claimed by another)."""


class JobWorker:
    def __init__(
        self,
        store: JobStore,
        engine: Engine,
        vm: VeraModel,
        tokenizer: PreTrainedTokenizerBase,
        adapters: AdapterService,
        config: FineTuneConfig,
        owner: str,
        exclusive: bool,
        *,
        on_trained: Callable[[str, int], None] | None = None,
    ) -> None:
        """``exclusive``: this process is the store's only user (a local directory), so jobs
        left running by a previous process are orphans and are requeued at start.
        ``on_trained(user_id, tokens)``: told after every optimizer step (usage metering)."""
        self.store, self.engine, self.vm, self.tokenizer = store, engine, vm, tokenizer
        self._on_trained = on_trained
        self.adapters, self.config, self.owner, self.exclusive = adapters, config, owner, exclusive
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.current: str | None = None  # id of the job being trained

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="vera-finetune", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current unit; a running job goes back to the queue."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """A job was queued here: look now instead of at the next poll."""
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """A cancel was recorded for ``job_id``: stop it at the next unit, not the next beat."""
        with self._lock:
            self._cancelled.add(job_id)

    # -- loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.exclusive:
            self._requeue_orphans()
        while not self._stopping.is_set():
            try:
                job = self.store.claim(self.owner, self.config.stale_s)
            except StoreUnavailable:
                job = None
            except Exception:
                log.exception("fine-tuning: claiming a job failed")
                job = None
            if job is None:
                self._wake.wait(self.config.poll_s)
                self._wake.clear()
                continue
            self.current = job.id
            try:
                self._run(job)
            except Exception:
                log.exception("fine-tuning job %s: unexpected failure", job.id)
                self._finish(job, "failed", error=_error("internal_error", "internal error"))
            finally:
                self.current = None
                with self._lock:
                    self._cancelled.discard(job.id)

    def _requeue_orphans(self) -> None:
        try:
            orphans = [j for j in _all_jobs(self.store) if j.status == "running"]
            for job in orphans:
                if job.owner is not None and self.store.requeue(job.id, job.owner):
                    self.store.add_event(
                        job.id,
                        "The server restarted while this job was running; it will run again "
                        "from the start.",
                        level="warn",
                    )
        except Exception:  # the store may be down at start; stale jobs are claimed later
            log.exception("fine-tuning: could not requeue jobs of a previous run")

    # -- one job ----------------------------------------------------------------------------
    def _run(self, job: JobRecord) -> None:
        if job.attempts > self.config.max_attempts:
            self._finish(
                job,
                "failed",
                error=_error(
                    "interrupted",
                    f"the job was interrupted {job.attempts - 1} times (server restarts or "
                    "replica failures) and was not retried again",
                ),
            )
            return
        resumed = f" again (attempt {job.attempts})" if job.attempts > 1 else ""
        self.store.add_event(job.id, f"Fine-tuning job started{resumed}.")
        try:
            train, valid = self._examples(job)
            hp = resolve_hyperparameters(job.hyperparameters)
            config = replace(hp, micro_batch_tokens=self.config.unit_tokens_idle)
            trainer = AdapterTrainer(self.vm, self.tokenizer, train, config)
        except TrainingDataError as e:
            self._finish(job, "failed", error=_error("invalid_training_file", str(e)))
            return
        resolved = {
            "n_epochs": config.epochs or "auto",
            "batch_size": trainer.batch_size,
            "learning_rate_multiplier": config.lr / TrainConfig().lr,
            "total_steps": trainer.total_steps,
        }
        self.store.heartbeat(job.id, self.owner, result={"hyperparameters": resolved})
        self.store.add_event(
            job.id,
            f"Training {len(train)} examples for up to {trainer.total_steps} steps.",
            data={"examples": len(train), "total_steps": trainer.total_steps},
        )
        try:
            self._train(job, trainer)
            valid_loss = self._evaluate(job, trainer, valid) if valid else None
        except _Stop:
            return
        report = trainer.report()
        meta = self.adapters.publish(job.user_id, trainer.adapter())
        result = {
            "hyperparameters": resolved,
            "adapter_version": meta.version,
            "steps": report.steps,
            "stop_reason": report.stop_reason,
            "first_loss": report.first_loss,
            "final_loss": report.final_loss,
            "valid_loss": valid_loss,
            "seconds": round(report.seconds, 2),
        }
        done = self._finish(
            job,
            "succeeded",
            fine_tuned_model=job.user_id,
            trained_tokens=report.trained_tokens,
            result=result,
        )
        if done is not None:
            self.store.add_event(
                job.id,
                f"New fine-tuned model created: {job.user_id} (adapter version {meta.version}); "
                f"{report.summary()}.",
                data=result,
            )
            self.store.add_event(job.id, "The job has successfully completed.")
            log.info("fine-tuning job %s for %s: %s", job.id, job.user_id, report.summary())

    def _examples(self, job: JobRecord) -> tuple[list[Example], list[Example]]:
        limits = self.config.limits
        out: list[list[Example]] = []
        for kind, file_id in (("training", job.training_file), ("validation", job.validation_file)):
            if file_id is None:
                out.append([])
                continue
            content = self.store.file_content(file_id)
            if content is None:
                raise TrainingDataError(f"the {kind} file {file_id} was deleted before training")
            try:
                out.append(read_examples(content, self.tokenizer, limits))
            except TrainingDataError as e:
                raise TrainingDataError(f"{kind} file {file_id}: {e}") from None
        return out[0], out[1]

    def _train(self, job: JobRecord, trainer: AdapterTrainer) -> None:
        every = max(1, math.ceil(trainer.total_steps / MAX_STEP_EVENTS))
        next_beat = time.monotonic() + self.config.heartbeat_s
        while not trainer.done:
            self._check(job)
            step = self._on_engine(job, lambda: trainer.micro_step(self._unit_tokens()))
            if step is not None and self._on_trained is not None:
                self._on_trained(job.user_id, step.tokens)
            if step is not None and (step.step % every == 0 or trainer.done):
                self._step_event(job, step)
            if time.monotonic() >= next_beat:
                self._beat(job, trainer.trained_tokens)
                next_beat = time.monotonic() + self.config.heartbeat_s

    def _evaluate(self, job: JobRecord, trainer: AdapterTrainer, examples: list[Example]) -> float:
        """Validation loss, a few examples per engine unit (token-weighted mean)."""
        total = count = 0.0
        for start in range(0, len(examples), 4):
            group = examples[start : start + 4]
            n = sum(sum(lab != IGNORE for lab in e.labels[1:]) for e in group)
            total += self._on_engine(job, lambda g=group: trainer.evaluate(g)) * n
            count += n
        return total / max(1.0, count)

    def _unit_tokens(self) -> int:
        """Run on the engine thread: small units while requests wait, large ones when idle."""
        if self.engine.serving:
            return self.config.unit_tokens_serving
        return self.config.unit_tokens_idle

    def _on_engine(self, job: JobRecord, fn: Any) -> Any:
        """Run one unit on the engine thread; a stopping engine hands the job back."""
        try:
            return self.engine.run_background(fn).result()
        except EngineStopped:
            self._stopping.set()
            self._hand_back(job)

    def _check(self, job: JobRecord) -> None:
        with self._lock:
            cancelled = job.id in self._cancelled
        if cancelled:
            self._cancel(job)
        if self._stopping.is_set():
            self._hand_back(job)

    def _beat(self, job: JobRecord, trained_tokens: int) -> None:
        try:
            if not self.store.heartbeat(job.id, self.owner, trained_tokens=trained_tokens):
                self.store.add_event(job.id, "This worker lost the job; stopping.", level="warn")
                raise _Stop()
            record = self.store.get_job(job.id)
        except StoreUnavailable:  # keep training; the next beat tries again
            log.warning("fine-tuning job %s: store unreachable for a heartbeat", job.id)
            return
        if record is not None and record.cancel_requested:
            self._cancel(job)

    def _step_event(self, job: JobRecord, step: StepReport) -> None:
        data = {
            "step": step.step,
            "total_steps": step.total_steps,
            "train_loss": round(step.loss, 6),
            "learning_rate": step.lr,
            "tokens": step.tokens,
        }
        with contextlib.suppress(StoreUnavailable):  # progress is best effort
            self.store.add_event(
                job.id,
                f"Step {step.step}/{step.total_steps}: training loss={step.loss:.4f}",
                type="metrics",
                data=data,
            )

    def _cancel(self, job: JobRecord) -> None:
        if self._finish(job, "cancelled") is not None:
            self.store.add_event(job.id, "The job was cancelled.")
        raise _Stop()

    def _hand_back(self, job: JobRecord) -> None:
        try:
            if self.store.requeue(job.id, self.owner):
                self.store.add_event(
                    job.id,
                    "The server is stopping; the job goes back to the queue and will run "
                    "again from the start.",
                    level="warn",
                )
        except StoreUnavailable:  # it stays 'running' and is claimed again once stale
            pass
        raise _Stop()

    def _finish(self, job: JobRecord, status: str, **fields: Any) -> JobRecord | None:
        record = self.store.finish(job.id, self.owner, status, **fields)
        if record is not None and status == "failed" and fields.get("error"):
            self.store.add_event(job.id, fields["error"]["message"], level="error")
        return record


def resolve_hyperparameters(hp: dict[str, Any]) -> TrainConfig:
    """OpenAI's hyperparameters ("auto" or a value) as a TrainConfig over our defaults."""
    base = TrainConfig()
    epochs = hp.get("n_epochs", "auto")
    batch = hp.get("batch_size", "auto")
    multiplier = hp.get("learning_rate_multiplier", "auto")
    return replace(
        base,
        epochs=None if epochs == "auto" else int(epochs),
        batch_size=base.batch_size if batch == "auto" else int(batch),
        lr=base.lr * (1.0 if multiplier == "auto" else float(multiplier)),
    )


def _error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None}


def _all_jobs(store: JobStore) -> list[JobRecord]:
    jobs: list[JobRecord] = []
    after = None
    while True:
        page, more = store.list_jobs(None, after=after, limit=100)
        jobs += page
        if not more or not page:
            return jobs
        after = page[-1].id

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
from functools import partial
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from adapters_store import AdapterNotFound, StoreUnavailable
from server.adapter_service import AdapterService
from server.engine import Engine, EngineStopped, SamplingParams
from server.engine.errors import QueueFull
from server.finetune.records import JobRecord
from server.finetune.references import ReferenceCache, reference_key
from server.finetune.store import JobStore
from vera_core.adapter import Adapter
from vera_core.fingerprint import model_fingerprint
from vera_core.general_prompts import ANCHOR_PROMPTS, PROBE
from vera_core.inject import VeraModel
from vera_core.retention import (
    REFERENCE_TOKENS,
    REFERENCE_TOP_K,
    ProbeItem,
    Reference,
    base_references,
    measure_quality,
    probe_items,
)
from vera_core.train import AdapterTrainer, StepReport, TrainConfig, adapter_header
from vera_core.train_data import IGNORE, DataLimits, Example, TrainingDataError, read_examples

log = logging.getLogger(__name__)

MAX_STEP_EVENTS = 200  # per job; longer jobs report every k-th step
SYSTEM_CLIENT = "*fine-tuning"  # the engine client (queue share, usage) of the references


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
    # a trained adapter that keeps fewer of the base model's right general answers than this
    # (vera_core.retention, on the held-out probe) is not published; 0 publishes every one
    min_retention: float = 0.5
    anchor_weight: float = TrainConfig.anchor_weight  # of every job; 0: no anchor
    max_replay_examples: int = 512  # a continuing job replays at most this many earlier ones
    reference_dir: Path | None = None  # where the base model's reference answers are kept


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
        # the base model's answers to the shipped general prompts, made by the first job
        self._anchor: list[Reference] | None = None
        self._probe: list[ProbeItem] | None = None

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
            init, replayed = self._continued(job)
            hp = resolve_hyperparameters(job.hyperparameters)
            config = replace(
                hp,
                micro_batch_tokens=self.config.unit_tokens_idle,
                anchor_weight=self.config.anchor_weight,
            )
        except TrainingDataError as e:
            self._finish(job, "failed", error=_error("invalid_training_file", str(e)))
            return
        except AdapterNotFound:
            message = (
                f"model {job.model!r} names the user's fine-tuned model, but the user has no "
                "adapter to continue from (deleted since the job was created?)"
            )
            self._finish(job, "failed", error=_error("model_not_found", message))
            return
        try:
            anchor, probe = self._general(job, config)
        except _Stop:
            return
        trainer = AdapterTrainer(
            self.vm, self.tokenizer, train + replayed.examples, config, init, anchor
        )
        resolved = {
            "n_epochs": config.epochs or "auto",
            "batch_size": trainer.batch_size,
            "learning_rate_multiplier": config.lr / TrainConfig().lr,
            "total_steps": trainer.total_steps,
        }
        self.store.heartbeat(job.id, self.owner, result={"hyperparameters": resolved})
        self.store.add_event(
            job.id,
            f"Training {len(train)} examples"
            + (f" and {len(replayed.examples)} replayed" if replayed.examples else "")
            + f" for up to {trainer.total_steps} steps"
            + (
                f", keeping the base model's answers to {len(anchor)} general prompts"
                if anchor
                else ""
            )
            + ".",
            data={
                "examples": len(train),
                "replayed_examples": len(replayed.examples),
                "anchor_prompts": len(anchor),
                "total_steps": trainer.total_steps,
            },
        )
        try:
            self._train(job, trainer)
            valid_loss = self._evaluate(job, trainer, valid) if valid else None
            quality = self._quality(job, trainer, train, replayed.examples, probe)
        except _Stop:
            return
        report = trainer.report()
        result: dict[str, Any] = {
            "hyperparameters": resolved,
            "steps": report.steps,
            "stop_reason": report.stop_reason,
            "first_loss": report.first_loss,
            "final_loss": report.final_loss,
            "anchor_kl": report.anchor_kl,
            "valid_loss": valid_loss,
            "quality": quality,
            "continued_from": replayed.continued_from,
            "replayed_files": replayed.files,
            "replayed_examples": len(replayed.examples),
            "seconds": round(report.seconds, 2),
        }
        self.store.add_event(job.id, _quality_message(quality), data=quality)
        retention = quality["retention"]
        if retention is not None and retention < self.config.min_retention:
            message = (
                f"not published: the trained adapter keeps {quality['retained']} of the "
                f"{quality['base_right']} general questions the base model answers right "
                f"({retention:.0%}), below this server's minimum of "
                f"{self.config.min_retention:.0%}; the user's adapter is unchanged. Fewer "
                "epochs, a lower learning_rate_multiplier or less repetitive data keep more."
            )
            self._finish(job, "failed", error=_error("retention_too_low", message), result=result)
            return
        meta = self.adapters.publish(job.user_id, trainer.adapter())
        result["adapter_version"] = meta.version
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

    def _continued(self, job: JobRecord) -> tuple[Adapter | None, Replay]:
        """A job whose model is the user's fine-tuned model (its user id) continues from the
        current adapter and replays the user's earlier training files (newest first, at most
        ``max_replay_examples`` examples), so earlier facts stay; else a fresh adapter."""
        if job.model != job.user_id:
            return None, Replay(None, [], [])
        meta = self.adapters.describe(job.user_id)
        flat = self.adapters.store.load_flat(job.user_id, meta.version)
        init = Adapter.from_flat(adapter_header(self.vm), self.vm.layout, flat)
        files: list[str] = []
        examples: list[Example] = []
        for earlier in _all_jobs(self.store, job.user_id):
            if earlier.status != "succeeded" or earlier.training_file in files:
                continue
            if earlier.training_file == job.training_file:
                continue
            content = self.store.file_content(earlier.training_file)
            if content is None:  # deleted by its owner: not replayed
                continue
            try:
                found = read_examples(content, self.tokenizer, self.config.limits)
            except TrainingDataError:  # limits changed since: skip, say so in the result
                continue
            room = self.config.max_replay_examples - len(examples)
            if room <= 0:
                break
            files.append(earlier.training_file)
            examples += found[:room]
        if files:
            self.store.add_event(
                job.id,
                f"Continuing from {job.user_id}'s adapter version {meta.version}, replaying "
                f"{len(examples)} examples of {len(files)} earlier training files.",
                data={"continued_from": meta.version, "replayed_files": files},
            )
        return init, Replay(meta.version, files, examples)

    def _general(
        self, job: JobRecord, config: TrainConfig
    ) -> tuple[list[Reference], list[ProbeItem]]:
        """The base model's answers to the shipped anchor prompts and probe questions, made
        once per server: generated as engine requests (batched with what it serves), their
        top-k distributions in background units of a few prompts."""
        if self._anchor is None or self._probe is None:
            self.store.add_event(
                job.id, "Preparing the base model's answers to general prompts (once per model)."
            )

            def run(fn: Any) -> Any:
                self._check(job)
                return self._on_engine(job, fn)

            def answers(asked: list[list[int]]) -> list[list[int]]:
                """Greedy base-model answers from the engine, batched with what it serves."""
                params = SamplingParams(max_new_tokens=REFERENCE_TOKENS)  # greedy
                requests: list[tuple[str | None, list[int], SamplingParams]] = [
                    (None, ids, params) for ids in asked
                ]
                done = self.engine.generate(requests, client=SYSTEM_CLIENT)
                return [r["token_ids"] for r in done]

            prompts = [*ANCHOR_PROMPTS, *(q for q, _ in PROBE)]
            key = reference_key(
                model_fingerprint(self.vm.model),
                prompts,
                max_new_tokens=REFERENCE_TOKENS,
                top_k=REFERENCE_TOP_K,
            )
            make = partial(
                base_references,
                self.vm.model,
                self.tokenizer,
                prompts,
                run=run,
                max_new_tokens=REFERENCE_TOKENS,
                top_k=REFERENCE_TOP_K,
            )

            def engine_first() -> list[Reference]:
                try:
                    return make(answers=answers)
                except QueueFull:  # the engine is full: generate in units instead (slower)
                    return make()

            root = self.config.reference_dir
            refs = (
                ReferenceCache(root).get(key, len(prompts), engine_first)
                if root
                else engine_first()
            )
            anchor, probe_refs = refs[: len(ANCHOR_PROMPTS)], refs[len(ANCHOR_PROMPTS) :]
            self._probe = probe_items(probe_refs, [k for _, k in PROBE])
            self._anchor = anchor
        return (self._anchor if config.anchor_weight > 0 else []), self._probe

    def _quality(
        self,
        job: JobRecord,
        trainer: AdapterTrainer,
        train: list[Example],
        replayed: list[Example],
        probe: list[ProbeItem],
    ) -> dict[str, Any]:
        """Recall of this job's training data (and of what it replayed) and retention of the
        base model's right answers on the held-out probe."""

        def run(fn: Any) -> Any:
            self._check(job)
            return self._on_engine(job, fn)

        tok = self.tokenizer
        q = measure_quality(self.vm, trainer.vector, train, probe, tok, run=run)
        out = q.as_dict()
        if replayed:
            r = measure_quality(self.vm, trainer.vector, replayed, [], tok, run=run)
            out["replay_recall"] = round(r.recall, 4)
        return out

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


@dataclass(frozen=True)
class Replay:
    """What a continuing job starts from and replays."""

    continued_from: int | None  # the adapter version it continues; None: a fresh adapter
    files: list[str]  # earlier training files replayed, newest first
    examples: list[Example]


def _quality_message(q: dict[str, Any]) -> str:
    kept = (
        "no general probe question is answered right by the base model"
        if q["retention"] is None
        else f"keeps {q['retained']}/{q['base_right']} of the base model's right general "
        f"answers ({q['retention']:.0%})"
    )
    return (
        f"Quality: recalls {q['recalled']}/{q['examples']} training examples "
        f"({q['recall']:.0%}); {kept}."
    )


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


def _all_jobs(store: JobStore, user_id: str | None = None) -> list[JobRecord]:
    """Every job (of ``user_id``), newest first."""
    jobs: list[JobRecord] = []
    after = None
    while True:
        page, more = store.list_jobs(user_id, after=after, limit=100)
        jobs += page
        if not more or not page:
            return jobs
        after = page[-1].id

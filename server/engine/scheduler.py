"""Which sequences run in the next step: pure CPU bookkeeping, testable without a model.

Contract: ``add(seq)``; ``schedule(try_start) -> StepPlan``; ``finish(seq) -> row moves``.
Running sequences own KV rows 0..n-1 in ``running`` order; when one leaves, the last one moves
into its row so the rows stay compact.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 64  # running sequences (KV rows)
    max_prefill_tokens: int = 1024  # prompt tokens admitted per step (at least one prompt)
    max_waiting: int = 1024  # queue bound; beyond it submit() is refused (HTTP 429)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_prefill_tokens < 1 or self.max_waiting < 1:
            raise ValueError("scheduler limits must be >= 1")


@dataclass
class StepPlan:
    prefill: list[Sequence] = field(default_factory=list)  # admitted this step
    decode: list[Sequence] = field(default_factory=list)  # already running: one token each
    dropped: list[Sequence] = field(default_factory=list)  # cancelled while waiting


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self, try_start: Callable[[Sequence], bool]) -> StepPlan:
        """Admit waiting sequences FIFO while rows and prefill budget last.

        ``try_start(seq)`` claims what the sequence needs outside the scheduler (its adapter
        slot); a sequence it refuses stays queued without blocking those behind it.
        """
        plan = StepPlan(decode=list(self.running))
        budget = self.config.max_prefill_tokens
        kept: deque[Sequence] = deque()
        while self.waiting:
            seq = self.waiting.popleft()
            if seq.cancelled.is_set():
                seq.status = Status.FINISHED
                plan.dropped.append(seq)
                continue
            room = len(self.running) < self.config.max_batch
            fits = budget >= len(seq.prompt_ids) or not plan.prefill
            if room and fits and try_start(seq):
                seq.status = Status.RUNNING
                seq.kv_row = len(self.running)
                self.running.append(seq)
                plan.prefill.append(seq)
                budget -= len(seq.prompt_ids)
            else:
                kept.append(seq)
        self.waiting = kept
        return plan

    def finish(self, seq: Sequence) -> tuple[int, int] | None:
        """Remove a running sequence; returns the (src, dst) KV row move that keeps rows compact."""
        row = seq.kv_row
        last = self.running.pop()
        seq.status = Status.FINISHED
        seq.kv_row = -1
        if last is seq:
            return None
        self.running[row] = last
        src = last.kv_row
        last.kv_row = row
        return src, row

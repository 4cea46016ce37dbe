"""Which sequences run in the next step: pure CPU bookkeeping, testable without a model.

Contract: ``add(seq)``; ``schedule(try_start) -> StepPlan``; ``finish(seq) -> row moves``.
Running sequences own KV rows 0..n-1 in ``running`` order; when one leaves, the last one moves
into its row so the rows stay compact.

Chunked prefill: each step prefills at most ``max_prefill_tokens`` prompt tokens, continuing
the prompts already admitted (oldest first) before admitting new ones, so a long prompt or a
burst is spread over several steps and every running stream still gets one token per step.
A sequence decodes once its whole prompt is in the KV cache.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 64  # running sequences (KV rows)
    max_prefill_tokens: int = 512  # prompt tokens prefilled per step (chunks of prompts)
    max_waiting: int = 1024  # queue bound; beyond it submit() is refused (HTTP 429)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_prefill_tokens < 1 or self.max_waiting < 1:
            raise ValueError("scheduler limits must be >= 1")


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens ``[start, start + length)`` of ``seq`` to prefill this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def final(self) -> bool:
        """The prompt is complete after this chunk: its last logits give the first token."""
        return self.start + self.length == len(self.seq.prompt_ids)


@dataclass
class StepPlan:
    prefill: list[Chunk] = field(default_factory=list)  # prompt chunks, oldest prompt first
    decode: list[Sequence] = field(default_factory=list)  # prompt cached: one token each
    dropped: list[Sequence] = field(default_factory=list)  # cancelled while waiting


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefilling: deque[Sequence] = deque()  # running, prompt not fully cached yet

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self, try_start: Callable[[Sequence], bool]) -> StepPlan:
        """Decode every sequence whose prompt is cached; spend the prefill budget on the
        prompts in progress, then admit waiting sequences FIFO while rows and budget last.

        ``try_start(seq)`` claims what the sequence needs outside the scheduler (its adapter
        slot); a sequence it refuses stays queued without blocking those behind it.
        """
        plan = StepPlan(decode=[s for s in self.running if s not in self.prefilling])
        budget = self.config.max_prefill_tokens
        for seq in list(self.prefilling):  # _chunk removes finished prompts
            if budget == 0:
                break
            budget -= self._chunk(plan, seq, budget)
        kept: deque[Sequence] = deque()
        while self.waiting:
            seq = self.waiting.popleft()
            if seq.cancelled.is_set():
                seq.status = Status.FINISHED
                plan.dropped.append(seq)
                continue
            room = len(self.running) < self.config.max_batch
            if room and budget > 0 and try_start(seq):
                seq.status = Status.RUNNING
                seq.kv_row = len(self.running)
                self.running.append(seq)
                self.prefilling.append(seq)
                budget -= self._chunk(plan, seq, budget)
            else:
                kept.append(seq)
        self.waiting = kept
        return plan

    def _chunk(self, plan: StepPlan, seq: Sequence, budget: int) -> int:
        """Plan the next chunk of ``seq``'s prompt within ``budget``; return its length."""
        chunk = Chunk(seq, seq.num_cached, min(budget, len(seq.prompt_ids) - seq.num_cached))
        plan.prefill.append(chunk)
        if chunk.final:
            self.prefilling.remove(seq)
        return chunk.length

    def finish(self, seq: Sequence) -> tuple[int, int] | None:
        """Remove a running sequence; returns the (src, dst) KV row move that keeps rows compact."""
        row = seq.kv_row
        if seq in self.prefilling:  # cancelled or failed mid-prompt
            self.prefilling.remove(seq)
        last = self.running.pop()
        seq.status = Status.FINISHED
        seq.kv_row = -1
        if last is seq:
            return None
        self.running[row] = last
        src = last.kv_row
        last.kv_row = row
        return src, row

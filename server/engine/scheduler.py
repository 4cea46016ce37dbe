"""Which sequences run in the next step: pure CPU bookkeeping, testable without a model.

Contract: ``add(seq)``; ``schedule() -> StepPlan``; ``finish(seq)``. The scheduler is given the
adapter slots it claims for sequences (an ``AdapterSlots``, the engine's ``SlotPool``) and
calls nothing else: what it decided, including the sequences that could not start and the KV
rows to move, is in the plan the engine runs.

Running sequences own KV rows 0..n-1 in ``running`` order. When one leaves, the last one takes
its row at once in the bookkeeping, and the copy of its cached K/V into that row is a
``RowMove`` of the next plan, applied before any forward reads it.

Chunked prefill: each step prefills at most ``max_prefill_tokens`` prompt tokens, continuing
the prompts already admitted (oldest first) before admitting new ones, so a long prompt or a
burst is spread over several steps and every running stream still gets one token per step.
A sequence decodes once its whole prompt is in the KV cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from server.engine.adapter_slots import SlotTicket
from server.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 64  # running sequences (KV rows)
    max_prefill_tokens: int = 512  # prompt tokens prefilled per step (chunks of prompts)
    max_waiting: int = 1024  # queue bound; beyond it submit() is refused (HTTP 429)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_prefill_tokens < 1 or self.max_waiting < 1:
            raise ValueError("scheduler limits must be >= 1")


class AdapterSlots(Protocol):
    """What the scheduler needs of the adapter memory (``adapter_slots.SlotPool``)."""

    def acquire(self, ticket: SlotTicket) -> int | None:
        """The ticket's device slot, pinned; None: not yet (loading, or every slot pinned).
        Raises when the sequence can never start (its load failed, or it waited too long)."""
        ...

    def release(self, slot: int) -> None:
        """Unpin a slot ``acquire`` returned."""
        ...


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


@dataclass(frozen=True)
class RowMove:
    """Copy the first ``length`` cached positions of KV row ``src`` into row ``dst``."""

    src: int
    dst: int
    length: int


@dataclass
class StepPlan:
    moves: list[RowMove] = field(default_factory=list)  # before any forward, in this order
    prefill: list[Chunk] = field(default_factory=list)  # prompt chunks, oldest prompt first
    decode: list[Sequence] = field(default_factory=list)  # prompt cached: one token each
    dropped: list[Sequence] = field(default_factory=list)  # cancelled while waiting
    failed: list[tuple[Sequence, str]] = field(default_factory=list)  # could never start: why


class Scheduler:
    def __init__(self, config: SchedulerConfig, slots: AdapterSlots | None = None) -> None:
        """``slots``: where sequences with an adapter ticket claim their slot (None: every
        sequence runs the base model)."""
        self.config = config
        self.slots = slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefilling: deque[Sequence] = deque()  # running, prompt not fully cached yet
        self._moves: list[RowMove] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> StepPlan:
        """Decode every sequence whose prompt is cached; spend the prefill budget on the
        prompts in progress, then admit waiting sequences FIFO while rows and budget last.
        A sequence whose adapter slot is not ready yet stays queued without blocking those
        behind it."""
        plan = StepPlan(moves=self._moves)
        self._moves = []
        plan.decode = [s for s in self.running if s not in self.prefilling]
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
            elif (
                len(self.running) < self.config.max_batch and budget > 0 and self._start(seq, plan)
            ):
                budget -= self._chunk(plan, seq, budget)
            elif seq.status is Status.WAITING:
                kept.append(seq)
        self.waiting = kept
        return plan

    def finish(self, seq: Sequence) -> None:
        """Remove a running sequence and unpin its adapter slot; the last running sequence
        takes its KV row (the copy is a move of the next plan), so rows stay compact."""
        row = seq.kv_row
        if seq in self.prefilling:  # cancelled or failed mid-prompt
            self.prefilling.remove(seq)
        last = self.running.pop()
        seq.status = Status.FINISHED
        seq.kv_row = -1
        if seq.adapter_slot:
            assert self.slots is not None
            self.slots.release(seq.adapter_slot)
            seq.adapter_slot = 0
        if not self.running:
            self._moves = []  # nothing left to read them: the cache is released
        elif last is not seq:
            self.running[row] = last
            self._moves.append(RowMove(last.kv_row, row, last.num_cached))
            last.kv_row = row

    def take_waiting(self) -> list[Sequence]:
        """Empty the queue (the engine is failing everything); returns what was in it."""
        out = list(self.waiting)
        self.waiting.clear()
        return out

    def _start(self, seq: Sequence, plan: StepPlan) -> bool:
        """Claim ``seq``'s adapter slot and give it the next KV row; False if it waits (or
        failed: then it is in ``plan.failed`` and leaves the queue)."""
        if seq.ticket is not None:
            assert self.slots is not None, "a sequence with an adapter needs adapter slots"
            try:
                if seq.ticket.error is not None:
                    raise seq.ticket.error
                slot = self.slots.acquire(seq.ticket)
            except Exception as e:  # adapter vanished, slots exhausted: this one only
                seq.status = Status.FINISHED
                plan.failed.append((seq, str(e)))
                return False
            if slot is None:
                return False
            seq.adapter_slot = slot
        seq.status = Status.RUNNING
        seq.kv_row = len(self.running)
        self.running.append(seq)
        self.prefilling.append(seq)
        return True

    def _chunk(self, plan: StepPlan, seq: Sequence, budget: int) -> int:
        """Plan the next chunk of ``seq``'s prompt within ``budget``; return its length."""
        chunk = Chunk(seq, seq.num_cached, min(budget, len(seq.prompt_ids) - seq.num_cached))
        plan.prefill.append(chunk)
        if chunk.final:
            self.prefilling.remove(seq)
        return chunk.length

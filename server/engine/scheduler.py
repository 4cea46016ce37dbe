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
A step with no row to decode may take ``idle_prefill_tokens`` instead: no stream waits on it,
and on a CPU a forward of a few hundred tokens runs its GEMMs below their speed (a 64-prompt
burst measured 1.65 ms per token in chunks of 512 against 1.48 in one forward, fp32, 2 cores).
A sequence decodes once its whole prompt is in the KV cache.

Who is admitted is the ``FairQueue``'s order (virtual token counters per client, or FIFO). When
every row is taken and the next client in that order holds fewer rows than its weighted share,
the scheduler preempts the most recently admitted sequence of the client furthest over its
share (whose counter is not below the waiting one's, and never its last row): its row is freed
now, and it goes back to
the head of its client's queue to be prefilled again (prompt and output so far) when it is
next admitted. So a client flooding every row makes another wait one step, not until its own
requests end; preempted work is recomputed, and is not charged again.

Shared prompts: a sequence whose prompt begins with at least ``share_prefix_tokens`` tokens of
a live sequence's prompt, of the same client and adapter (its ``parent``, found by
``prompt_share.PromptIndex`` when it is added: the ``n`` choices of one request, a system
prompt or preamble a client sends with every request), takes a row whose first ``shared``
positions are a copy of the parent's, and prefills only the rest (at least its last prompt
token, whose logits give its own first token). The copy is a ``RowMove`` before the forward
when the parent holds them cached, or a ``PromptCopy`` after the forward of the step in which
the parent's chunk computes them (so a burst starts in one step, and a parent that ends at its
first token still gives them); otherwise the sequence waits. So ``n`` choices cost one prompt,
a shared preamble is computed once, and each sequence still samples on its own. If the parent
cannot give its positions any more (it ended, or was cancelled), the sequence looks again.

Finished contexts: when a sequence ends, the engine asks ``retain`` to keep what its row holds
(prompt and output) in the ``PrefixCache`` (at most ``prefix_cache_bytes``); a later prompt of
the same client and adapter that begins with it (the next turn of a conversation) takes those
positions with a ``Restore`` (a row write of the plan, ordered with its moves), and prefills
only the new tokens.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.engine.adapter_slots import SlotTicket
from server.engine.fair_queue import FairnessConfig, FairQueue
from server.engine.prefix_cache import CachedPrefix, PrefixCache, RowReader
from server.engine.prompt_share import PromptIndex
from server.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 64  # running sequences (KV rows)
    max_prefill_tokens: int = 512  # prompt tokens prefilled per step (chunks of prompts)
    # ... in a step with no row decoding; None: max_prefill_tokens
    idle_prefill_tokens: int | None = None
    max_waiting: int = 1024  # queue bound; beyond it submit() is refused (HTTP 429)
    max_waiting_per_client: int = 256  # one client's share of the queue; beyond it: its 429
    # a prompt sharing at least this many leading tokens with a live one of the same client
    # and adapter starts from a copy of them (0: only a prompt identical to a live one)
    share_prefix_tokens: int = 16
    # K/V of finished requests kept for prompts that begin with them (a conversation's next
    # turn), per engine; 0: none kept
    prefix_cache_bytes: int = 512 << 20
    fairness: FairnessConfig = FairnessConfig()

    def __post_init__(self) -> None:
        limits = (self.max_batch, self.max_prefill_tokens, self.max_waiting)
        if min(limits) < 1 or self.max_waiting_per_client < 1 or self.idle_budget < 1:
            raise ValueError("scheduler limits must be >= 1")
        if self.share_prefix_tokens < 0 or self.prefix_cache_bytes < 0:
            raise ValueError("share_prefix_tokens and prefix_cache_bytes must be >= 0")

    @property
    def idle_budget(self) -> int:
        """Prompt tokens of a step in which no row decodes."""
        idle = self.idle_prefill_tokens
        return self.max_prefill_tokens if idle is None else idle


TURNOVER_STEPS = 16  # a row ending within this many steps is waited for, not preempted


def _remaining(seq: Sequence) -> int:
    """Steps ``seq`` may still run (its stop strings and EOS may end it sooner)."""
    return seq.params.max_new_tokens - len(seq.output_ids)


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
    """Context tokens ``[start, start + length)`` of ``seq`` to prefill this step (its prompt,
    and the output so far when a preempted sequence is prefilled again)."""

    seq: Sequence
    start: int
    length: int
    final: bool  # the context is cached after it: its last logits give the next token


@dataclass(frozen=True)
class RowMove:
    """Copy the first ``length`` cached positions of KV row ``src`` into row ``dst``."""

    src: int
    dst: int
    length: int


@dataclass(frozen=True)
class PromptCopy:
    """After the step's forward, copy the first ``length`` cached positions of ``src``'s KV row
    into ``dst``'s, which then holds them cached: ``src`` computes them in this step. Rows are
    read when the copy runs (a compaction of the same plan may have moved them)."""

    src: Sequence
    dst: Sequence
    length: int


@dataclass(frozen=True)
class Restore:
    """Write ``entry``'s first ``length`` positions (a finished request's K/V, from the prefix
    cache) into KV row ``row``: one of the plan's row writes, in their order (a later move may
    copy the row on, to a sequence sharing the prefix or to compact the rows)."""

    entry: CachedPrefix
    row: int
    length: int


@dataclass
class StepPlan:
    # row writes before any forward, in this order: moves, and restores from the prefix cache
    moves: list[RowMove | Restore] = field(default_factory=list)
    copies: list[PromptCopy] = field(default_factory=list)  # after the forward
    prefill: list[Chunk] = field(default_factory=list)  # prompt chunks, oldest prompt first
    decode: list[Sequence] = field(default_factory=list)  # prompt cached: one token each
    dropped: list[Sequence] = field(default_factory=list)  # cancelled while waiting
    failed: list[tuple[Sequence, str]] = field(default_factory=list)  # could never start: why
    preempted: list[Sequence] = field(default_factory=list)  # back in the queue, row freed

    def share_time(self, seconds: float) -> None:
        """Give each sequence of the step its share of the step's ``seconds``, by the tokens
        it put through the model (a prompt chunk's length; one per decoded row)."""
        tokens = sum(c.length for c in self.prefill) + len(self.decode)
        if not tokens:
            return
        per_token = seconds / tokens
        for chunk in self.prefill:
            chunk.seq.engine_seconds += chunk.length * per_token
        for seq in self.decode:
            seq.engine_seconds += per_token


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        slots: AdapterSlots | None = None,
        weight: Callable[[str], float] = lambda _: 1.0,
    ) -> None:
        """``slots``: where sequences with an adapter ticket claim their slot (None: every
        sequence runs the base model). ``weight(client)``: a client's share (its tier)."""
        self.config = config
        self.slots = slots
        self.weight = weight
        self.waiting = FairQueue(config.fairness, weight)
        self.running: list[Sequence] = []
        self.prefilling: deque[Sequence] = deque()  # running, prompt not fully cached yet
        self._moves: list[RowMove | Restore] = []
        self.prefixes = PrefixCache(config.prefix_cache_bytes, config.share_prefix_tokens)
        self.prompts = PromptIndex(config.share_prefix_tokens, self.prefixes)
        self.forked = 0  # sequences started from a copy of a parent's prompt
        self.shared_tokens = 0  # prompt positions copied instead of computed

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``, linked to the live sequence whose prompt it may start from."""
        self.prompts.link(seq, live=len(self) + 1)
        self.waiting.push(seq, {s.client for s in self.running})

    def schedule(self) -> StepPlan:
        """Decode every sequence whose prompt is cached; spend the prefill budget on the
        prompts in progress, then admit waiting sequences in the queue's order while rows and
        budget last (preempting for a client below its share when rows are full). Under fair
        scheduling a waiting client with no prompt in progress, whose counter is not above any
        client with one, is admitted first, so another client's burst of long prompts does not hold
        its first token off. A client whose next sequence cannot start yet (its adapter is
        loading) does not block others."""
        plan = StepPlan(decode=[s for s in self.running if s not in self.prefilling])
        for seq in [s for s in self.waiting if s.cancelled.is_set()]:
            self.waiting.remove(seq)
            seq.status = Status.FINISHED
            plan.dropped.append(seq)
        budget = self.config.max_prefill_tokens if plan.decode else self.config.idle_budget
        admitted: list[Sequence] = []
        blocked: set[str] = set()
        if self.config.fairness.policy == "fair" and self.prefilling:
            counters = self.waiting.counters
            below = min(counters.get(s.client, 0.0) for s in self.prefilling)
            busy = {s.client for s in self.prefilling}  # their own prompts go on first
            budget = self._admit(plan, budget, admitted, blocked | busy, below)
        for seq in list(self.prefilling):  # _chunk removes finished prompts
            if budget == 0:
                break
            if seq not in admitted:  # those have their chunk already
                budget -= self._chunk(plan, seq, budget)
        self._admit(plan, budget, admitted, blocked, None)
        for seq in plan.decode:
            self.waiting.charge(seq.client, output_tokens=1)
        for chunk in plan.prefill:
            if chunk.final:  # its last logits give a token
                self.waiting.charge(chunk.seq.client, output_tokens=1)
        plan.moves, self._moves = self._moves, []
        return plan

    def retain(self, seq: Sequence, kv: RowReader) -> None:
        """Keep the K/V of ``seq`` (running, at its normal end; before ``finish``) for prompts
        that begin with its context. Its data may still sit in another row: rows are given
        to others at once, the copies run with the next plan."""
        row = seq.kv_row
        for move in reversed(self._moves):  # where its data is until the moves run (only
            if isinstance(move, RowMove) and move.dst == row:  # compaction moves by now)
                row = move.src
        self.prefixes.retain(seq, self.prompts.key(seq), kv, row)

    def finish(self, seq: Sequence) -> None:
        """Remove a running sequence and unpin its adapter slot; the last running sequence
        takes its KV row (the copy is a move of the next plan), so rows stay compact."""
        self._release_row(seq)
        seq.status = Status.FINISHED

    def take_waiting(self) -> list[Sequence]:
        """Empty the queue (the engine is failing everything); returns what was in it."""
        out = list(self.waiting)
        for seq in out:
            self.waiting.remove(seq)
        return out

    def tenants(self) -> dict[str, dict[str, float | int]]:
        """Every client seen: its counter, weight, running and waiting sequences (a snapshot,
        safe from any thread)."""
        rows = Counter(s.client for s in list(self.running))
        return {
            client: {
                "counter": round(counter, 1),
                "weight": self.weight(client),
                "running": rows.get(client, 0),
                "waiting": waiting,
            }
            for client, (counter, waiting) in self.waiting.snapshot().items()
        }

    # -- admission ------------------------------------------------------------------------
    def _admit(
        self,
        plan: StepPlan,
        budget: int,
        admitted: list[Sequence],
        blocked: set[str],
        below: float | None,
    ) -> int:
        """Admit waiting sequences in the queue's order while budget lasts (only clients whose
        counter is not above ``below``, when given); returns the budget left."""
        while budget > 0:
            order = self.waiting.order()
            client = next((c for c in order if c not in blocked), None)
            if client is None or (below is not None and self.waiting.counters[client] > below):
                break
            seq = self.waiting.head(client)
            fork = self._fork_source(seq, plan) if seq.parent is not None else None
            if fork == "wait":
                blocked.add(client)  # its parent's prompt is still being prefilled
                continue
            claimed = self._claim_slot(seq, plan)
            if claimed is None:  # can never start: failed, in the plan
                self.waiting.pop(client)
                continue
            if not claimed:  # its adapter is not ready yet
                blocked.add(client)
                continue
            if len(self.running) >= self.config.max_batch:
                victim = self._victim(client, admitted, plan)
                if victim is None:  # no row for this client; another may take one back
                    self._unclaim(seq)
                    blocked.add(client)
                    continue
                budget += self._preempt(victim, plan)
            self.waiting.pop(client)
            forked = seq.parent is not None
            if seq.preemptions == 0:  # a recompute is not charged again; a fork, what it computes
                self.waiting.charge(client, prompt_tokens=len(seq.prompt_ids) - seq.shared)
            self._take_row(seq)
            if forked:
                self._fork(seq, plan, after=fork == "after")
            admitted.append(seq)
            if fork != "after":  # a copy after the forward: its own tokens from the next step
                budget -= self._chunk(plan, seq, budget)
        return budget

    def _claim_slot(self, seq: Sequence, plan: StepPlan) -> bool | None:
        """Pin ``seq``'s adapter slot. True: it may start; False: not yet (loading, every
        slot pinned); None: never (then it is in ``plan.failed``)."""
        if seq.ticket is None:
            return True
        assert self.slots is not None, "a sequence with an adapter needs adapter slots"
        try:
            if seq.ticket.error is not None:
                raise seq.ticket.error
            slot = self.slots.acquire(seq.ticket)
        except Exception as e:  # adapter vanished, slots exhausted: this one only
            seq.status = Status.FINISHED
            plan.failed.append((seq, str(e)))
            return None
        if slot is None:
            return False
        seq.adapter_slot = slot
        return True

    def _fork_source(self, seq: Sequence, plan: StepPlan) -> str | None:
        """How ``seq`` (which has a parent) may start now. "cached": the parent holds the
        ``shared`` positions (copied before the forward), or they are in the prefix cache
        (restored before it); "after": the parent's chunk in this plan computes them (copied
        after the forward, so that a parent ending at its first token still gives them;
        ``seq`` prefills from the next step); None: alone (no source left); "wait": not yet.
        A parent that itself takes its prefix from a copy after this forward passes on its
        source: the sequence copies the part they have in common from there (a burst of
        prompts linked in chains starts in one step, not one step per link). A parent that
        cannot give its positions any more (ended, cancelled, evicted) is looked for again:
        an ended one's context is usually in the cache now."""
        parent = seq.parent
        assert parent is not None
        if isinstance(parent, CachedPrefix):
            if parent.alive:
                return "cached"
        elif parent.status is Status.RUNNING and not parent.cancelled.is_set():
            if parent.num_cached >= seq.shared:
                return "cached"
            if any(c.seq is parent and c.start + c.length >= seq.shared for c in plan.prefill):
                return "after"
            for copy in plan.copies:  # the parent copies its own prefix after this forward:
                if copy.dst is parent:  # take the common part from the same source
                    seq.parent, seq.shared = copy.src, min(seq.shared, copy.length)
                    return "after"
            return "wait"
        elif parent.status is not Status.FINISHED and not parent.cancelled.is_set():
            return "wait"  # waiting (or preempted): it is prefilled again first
        self.prompts.relink(seq)  # only running prompts and cached contexts: no loop
        return None if seq.parent is None else self._fork_source(seq, plan)

    def _fork(self, seq: Sequence, plan: StepPlan, after: bool) -> None:
        """``seq`` (just given its row) takes its parent's first ``shared`` positions: a move
        before the forward, a restore from the prefix cache, or ``after`` the forward (the
        parent computes them in this step)."""
        parent, seq.parent = seq.parent, None
        assert parent is not None
        if isinstance(parent, CachedPrefix):
            seq.num_cached = seq.shared
            self._moves.append(Restore(parent, seq.kv_row, seq.shared))
            self.prefixes.restored(parent, seq.shared)
        elif after:  # cached once the copy ran (the model runner counts them then)
            plan.copies.append(PromptCopy(parent, seq, seq.shared))
        else:
            seq.num_cached = seq.shared
            self._moves.append(RowMove(parent.kv_row, seq.kv_row, seq.shared))
        self.forked += 1
        self.shared_tokens += seq.shared

    def _unclaim(self, seq: Sequence) -> None:
        if seq.adapter_slot:
            assert self.slots is not None
            self.slots.release(seq.adapter_slot)
            seq.adapter_slot = 0

    def _take_row(self, seq: Sequence) -> None:
        seq.status = Status.RUNNING
        seq.kv_row = len(self.running)
        self.running.append(seq)
        self.prefilling.append(seq)

    def _chunk(self, plan: StepPlan, seq: Sequence, budget: int) -> int:
        """Plan the next chunk of ``seq``'s context within ``budget``; return its length."""
        need = len(seq.prompt_ids) + len(seq.output_ids) - seq.num_cached
        chunk = Chunk(seq, seq.num_cached, min(budget, need), final=budget >= need)
        plan.prefill.append(chunk)
        if chunk.final:
            self.prefilling.remove(seq)
        return chunk.length

    # -- preemption -----------------------------------------------------------------------
    def _victim(self, client: str, admitted: list[Sequence], plan: StepPlan) -> Sequence | None:
        """With every row taken: the sequence to preempt so that ``client`` gets a row, or
        None. Only for a client below its share, from the client furthest over its share
        whose counter is not below it, never that client's last row; and only when waiting
        for a row would not do: ``client`` holds no row at all (it would wait for the flood),
        or no row over share ends within ``TURNOVER_STEPS`` (long requests; then at most one
        such preemption per step). Rows of short requests turn over by themselves and go
        to the lowest counter: no recompute. Never a sequence another copies from after
        this step's forward."""
        fairness = self.config.fairness
        if fairness.policy != "fair" or not fairness.preempt:
            return None
        rows = Counter(s.client for s in self.running)
        active = set(rows) | set(self.waiting.order())
        total = sum(self.weight(c) for c in active)
        share = {c: self.config.max_batch * self.weight(c) / total for c in active}
        mine = rows.get(client, 0)
        if mine >= share[client]:
            return None  # the waiting client already has its share
        counters = self.waiting.counters
        over = [  # a client's last row is never taken: with more clients than rows, turns
            c  # come as rows free (by counter), not by preempting one another every step
            for c in rows
            if c != client and rows[c] > max(1.0, share[c]) and counters[c] >= counters[client]
        ]
        if not over:
            return None
        if mine > 0:
            if plan.preempted:
                return None
            ending = min(_remaining(s) for s in self.running if s.client in over)
            if ending <= TURNOVER_STEPS:
                return None  # a row frees soon: it goes to the lowest counter, no recompute
        worst = max(over, key=lambda c: rows[c] - share[c])
        sources = {c.src for c in plan.copies}
        candidates = [
            s for s in self.running if s.client == worst and s not in admitted and s not in sources
        ]
        return candidates[-1] if candidates else None  # the most recently admitted

    def _preempt(self, seq: Sequence, plan: StepPlan) -> int:
        """Take ``seq``'s row back now; it waits at its client's head, to be prefilled again.
        Returns the prefill budget its planned chunk had taken (0 if none)."""
        refund = sum(c.length for c in plan.prefill if c.seq is seq)
        plan.prefill = [c for c in plan.prefill if c.seq is not seq]
        if seq in plan.decode:
            plan.decode.remove(seq)
        self._release_row(seq)
        seq.status = Status.WAITING
        seq.num_cached = seq.shared = 0  # prefilled again, all of it
        seq.preemptions += 1
        self.waiting.push_front(seq)
        plan.preempted.append(seq)
        return refund

    def _release_row(self, seq: Sequence) -> None:
        row = seq.kv_row
        if seq in self.prefilling:  # cancelled or failed mid-prompt
            self.prefilling.remove(seq)
        last = self.running.pop()
        seq.kv_row = -1
        self._unclaim(seq)
        if not self.running:
            self._moves = []  # nothing left to read them: the cache is released
        elif last is not seq:
            self.running[row] = last
            self._moves.append(RowMove(last.kv_row, row, last.num_cached))
            last.kv_row = row

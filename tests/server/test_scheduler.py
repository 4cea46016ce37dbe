"""The scheduler alone: admission order, limits, compaction, cancellation."""

from __future__ import annotations

import itertools

import pytest
import torch

from server.engine.adapter_slots import SlotTicket
from server.engine.detokenizer import StopChecker
from server.engine.prefix_cache import CachedPrefix
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import (
    PromptCopy,
    Restore,
    RowMove,
    Scheduler,
    SchedulerConfig,
    StepPlan,
)
from server.engine.sequence import Channel, Sequence, Status

FIRST = itertools.count(1000)


def seq(
    name: str,
    n: int = 4,
    user: str | None = None,
    client: str | None = None,
    prompt: list[int] | None = None,
) -> Sequence:
    """A sequence of ``n`` prompt tokens, its first one its own (no prompt shared with another
    sequence), unless ``prompt`` is given."""
    params = SamplingParams()
    s = Sequence(
        request_id=name,
        user_id=user,
        prompt_ids=prompt if prompt is not None else [next(FIRST), *range(n - 1)],
        params=params,
        channel=Channel(),
        detok=StopChecker(None, params.stop),
        client=client or user or "anonymous",
    )
    if user is not None:
        s.ticket = SlotTicket(user, 1, 0.0)
    return s


class Slots:
    """Adapter slots by hand: ``ready`` users get a slot, ``broken`` ones raise."""

    def __init__(self, ready: set[str] = frozenset(), broken: set[str] = frozenset()) -> None:
        self.ready, self.broken = set(ready), set(broken)
        self.pinned: dict[int, int] = {}
        self._slot_of: dict[str, int] = {}

    def acquire(self, ticket: SlotTicket) -> int | None:
        if ticket.user_id in self.broken:
            raise LookupError(f"{ticket.user_id} has no adapter any more")
        if ticket.user_id not in self.ready:
            return None
        slot = self._slot_of.setdefault(ticket.user_id, len(self._slot_of) + 1)
        self.pinned[slot] = self.pinned.get(slot, 0) + 1
        return slot

    def release(self, slot: int) -> None:
        assert self.pinned.get(slot, 0) > 0
        self.pinned[slot] -= 1


def seqs_of(plan: StepPlan) -> list[Sequence]:
    return [c.seq for c in plan.prefill]


def test_admits_fifo_up_to_max_batch() -> None:
    s = Scheduler(SchedulerConfig(max_batch=2, max_prefill_tokens=100))
    a, b, c = seq("a"), seq("b"), seq("c")
    for x in (a, b, c):
        s.add(x)
    plan = s.schedule()
    assert seqs_of(plan) == [a, b] and plan.decode == []
    assert [x.kv_row for x in (a, b)] == [0, 1] and c.status is Status.WAITING
    plan = s.schedule()
    assert plan.prefill == [] and plan.decode == [a, b]


def cached(plan: StepPlan) -> None:
    """What the model runner does with a plan: the chunks' tokens are now in the cache, and
    then the copies' positions."""
    for c in plan.prefill:
        c.seq.num_cached = c.start + c.length
    for copy in plan.copies:
        copy.dst.num_cached = copy.length


def test_long_prompt_is_prefilled_in_chunks_while_others_decode() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, max_prefill_tokens=16))
    first, big, small = seq("first", 3), seq("big", 50), seq("small", 4)
    s.add(first)
    cached(s.schedule())
    first.output_ids.append(7)  # its first token came out of that step
    s.add(big)
    s.add(small)
    spans = []
    for _ in range(4):
        plan = s.schedule()
        assert first in plan.decode and big not in plan.decode  # never waits for the prompt
        spans.append([(c.seq.request_id, c.start, c.length, c.final) for c in plan.prefill])
        cached(plan)
    assert spans == [
        [("big", 0, 16, False)],
        [("big", 16, 16, False)],
        [("big", 32, 16, False)],
        [("big", 48, 2, True), ("small", 0, 4, True)],  # the budget left admits the next
    ]
    big.output_ids.append(1), small.output_ids.append(1)
    assert s.schedule().decode == [first, big, small]


def test_idle_budget_only_while_no_row_decodes() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, max_prefill_tokens=16, idle_prefill_tokens=40))
    a, b, c = seq("a", 30), seq("b", 30), seq("c", 30)
    for x in (a, b, c):
        s.add(x)
    spans = []
    for _ in range(3):
        plan = s.schedule()
        spans.append(
            (
                [x.request_id for x in plan.decode],
                [(x.seq.request_id, x.length) for x in plan.prefill],
            )
        )
        cached(plan)
        for x in plan.prefill:
            if x.final:
                x.seq.output_ids.append(1)
    assert spans == [
        ([], [("a", 30), ("b", 10)]),  # nothing decodes: the idle budget
        (["a"], [("b", 16)]),  # a decodes: chunks of 16 again
        (["a"], [("b", 4), ("c", 12)]),
    ]
    with pytest.raises(ValueError):
        SchedulerConfig(idle_prefill_tokens=0)


def test_cancel_mid_prompt_frees_the_row_and_the_budget() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, max_prefill_tokens=8))
    big, other = seq("big", 40), seq("other", 4)
    s.add(big)
    cached(s.schedule())
    s.finish(big)
    assert not s.prefilling and not s.running
    s.add(other)
    plan = s.schedule()
    assert [(c.seq, c.start, c.length) for c in plan.prefill] == [(other, 0, 4)]


def test_sequence_waiting_for_its_adapter_does_not_block_others() -> None:
    slots = Slots()
    s = Scheduler(SchedulerConfig(max_batch=8), slots)
    slow, fast = seq("slow", user="alice"), seq("fast")
    s.add(slow)
    s.add(fast)
    plan = s.schedule()  # alice's adapter still loading
    assert seqs_of(plan) == [fast] and list(s.waiting) == [slow]
    slots.ready.add("alice")
    plan = s.schedule()
    assert seqs_of(plan) == [slow] and slow.adapter_slot == 1 and slots.pinned == {1: 1}


def test_a_sequence_that_can_never_start_is_in_the_plan_not_the_queue() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8), Slots(broken={"ghost"}))
    ghost, other = seq("ghost", user="ghost"), seq("other")
    s.add(ghost)
    s.add(other)
    plan = s.schedule()
    assert [(q, "no adapter" in why) for q, why in plan.failed] == [(ghost, True)]
    assert seqs_of(plan) == [other] and not s.waiting and ghost.status is Status.FINISHED


def test_finish_unpins_the_adapter_slot() -> None:
    slots = Slots(ready={"alice"})
    s = Scheduler(SchedulerConfig(max_batch=8), slots)
    a = seq("a", user="alice")
    s.add(a)
    s.schedule()
    assert slots.pinned == {1: 1}
    s.finish(a)
    assert slots.pinned == {1: 0} and a.adapter_slot == 0 and a.status is Status.FINISHED


def test_finish_keeps_rows_compact_and_the_next_plan_moves_them() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8))
    seqs = [seq(str(i)) for i in range(4)]
    for x in seqs:
        s.add(x)
    cached(s.schedule())
    s.finish(seqs[1])  # the last row moves into the hole
    assert [x.kv_row for x in s.running] == [0, 1, 2] and s.running[1] is seqs[3]
    s.finish(seqs[2])  # the last row leaves: nothing moves
    assert [x.request_id for x in s.running] == ["0", "3"]
    plan = s.schedule()
    assert plan.moves == [RowMove(3, 1, 4)]  # 4 prompt tokens cached in row 3, now row 1
    assert s.schedule().moves == []  # a move is planned once


def test_moves_are_dropped_when_nothing_runs_any_more() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8))
    a, b = seq("a"), seq("b")
    s.add(a)
    s.add(b)
    cached(s.schedule())
    s.finish(a)
    s.finish(b)
    assert s.schedule().moves == []  # the cache is released: nothing to copy


def test_cancelled_waiting_sequences_are_dropped() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8))
    a = seq("a")
    a.cancel()
    s.add(a)
    plan = s.schedule()
    assert plan.dropped == [a] and not s.running and not s.waiting


PREAMBLE = list(range(500, 520))  # 20 tokens a client sends before every question


def test_a_shared_preamble_is_copied_from_the_live_prompt_not_prefilled_again() -> None:
    """Both arrive together: the first computes the preamble, the second takes a row in the
    same step and a copy of it after the forward, then prefills only its own tail."""
    s = Scheduler(SchedulerConfig(max_batch=8, max_prefill_tokens=100, share_prefix_tokens=16))
    a = seq("a", prompt=[*PREAMBLE, 1, 2, 3])
    b = seq("b", prompt=[*PREAMBLE, 7, 8])
    charged: list[int] = []
    charge = s.waiting.charge
    s.waiting.charge = lambda client, prompt_tokens=0, output_tokens=0: (  # type: ignore[method-assign]
        charged.append(prompt_tokens) if prompt_tokens else None,
        charge(client, prompt_tokens, output_tokens),
    )
    s.add(a)
    s.add(b)
    assert (b.parent, b.shared) == (a, 20)
    plan = s.schedule()
    assert seqs_of(plan) == [a] and plan.copies == [PromptCopy(a, b, 20)]
    assert b.status is Status.RUNNING and b.num_cached == 0 and not s.waiting
    cached(plan)
    plan = s.schedule()
    assert plan.moves == [] and plan.copies == []
    assert [(c.seq, c.start, c.length, c.final) for c in plan.prefill] == [(b, 20, 2, True)]
    assert plan.decode == [a] and (s.forked, s.shared_tokens) == (1, 20)
    assert charged == [23, 2]  # each charged the prompt tokens it computes


def test_a_prompt_cached_already_is_copied_before_the_forward() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, share_prefix_tokens=16))
    a = seq("a", prompt=[*PREAMBLE, 1, 2, 3])
    s.add(a)
    cached(s.schedule())
    b = seq("b", prompt=[*PREAMBLE, 7, 8])
    s.add(b)
    plan = s.schedule()
    assert plan.moves == [RowMove(a.kv_row, b.kv_row, 20)] and plan.copies == []
    assert [(c.seq, c.start, c.length) for c in plan.prefill] == [(b, 20, 2)]


def test_a_parent_ending_at_its_first_token_still_gives_its_prompt() -> None:
    """max_tokens 1 (a classifier, a scorer): the parent is done in the step that computed the
    preamble; the copy ran after that forward, before its row was freed."""
    s = Scheduler(SchedulerConfig(max_batch=8, share_prefix_tokens=16))
    a = seq("a", prompt=[*PREAMBLE, 1])
    b, c = seq("b", prompt=[*PREAMBLE, 2]), seq("c", prompt=[*PREAMBLE, 3])
    for x in (a, b, c):
        s.add(x)
    plan = s.schedule()
    assert plan.copies == [PromptCopy(a, b, 20), PromptCopy(a, c, 20)]
    cached(plan)
    s.finish(a)  # c, the last row, takes a's row 0 with its 20 cached positions
    plan = s.schedule()
    assert plan.moves == [RowMove(2, 0, 20)]
    assert [(x.seq, x.start, x.length) for x in plan.prefill] == [(b, 20, 1), (c, 20, 1)]


def test_a_chain_of_prompts_starts_in_one_step_from_the_first() -> None:
    """c shares most with b, which shares its prefix with a: while b takes its copy from a
    after the forward, c takes the part the three have in common from a too, in the same
    step, and computes the rest itself (rather than waiting a step for b)."""
    s = Scheduler(SchedulerConfig(max_batch=8, share_prefix_tokens=16))
    a = seq("a", prompt=[*PREAMBLE, 1, 1, 1])
    b = seq("b", prompt=[*PREAMBLE, 2, 5, 5])
    c = seq("c", prompt=[*PREAMBLE, 2, 5, 6])
    for x in (a, b, c):
        s.add(x)
    assert (b.parent, c.parent, c.shared) == (a, b, 22)
    plan = s.schedule()
    assert plan.copies == [PromptCopy(a, b, 20), PromptCopy(a, c, 20)]
    cached(plan)
    plan = s.schedule()
    assert [(x.seq, x.start, x.length) for x in plan.prefill] == [(b, 20, 3), (c, 20, 3)]


def test_a_parent_caught_mid_prompt_gives_what_it_has_cached() -> None:
    """With chunked prefill the child starts once the parent's chunks cover the shared part,
    not when the parent's whole prompt is in."""
    s = Scheduler(SchedulerConfig(max_batch=8, max_prefill_tokens=16, share_prefix_tokens=8))
    a = seq("a", prompt=[*PREAMBLE, *range(6)])
    b = seq("b", prompt=[*PREAMBLE[:10], 99, 98])
    s.add(a)
    s.add(b)
    assert b.shared == 10
    plan = s.schedule()  # the budget goes to a's first 16
    assert [(c.seq, c.start, c.length) for c in plan.prefill] == [(a, 0, 16)]
    cached(plan)
    plan = s.schedule()  # a's last 10, and b from a copy of a's first 10
    assert plan.moves == [RowMove(a.kv_row, b.kv_row, 10)] and plan.copies == []
    assert [(c.seq, c.start, c.length) for c in plan.prefill] == [(a, 16, 10), (b, 10, 2)]


@pytest.mark.parametrize(
    "other",
    [
        dict(client="bob"),  # another tenant: never shared
        dict(user="ana"),  # another adapter
        dict(prompt=[*PREAMBLE[:15], 7, 8]),  # 15 tokens in common: below the bound
        dict(scores=True),  # it scores its prompt: computes it all
    ],
    ids=["tenant", "adapter", "short", "scored"],
)
def test_no_copy_across_tenants_adapters_or_below_the_bound(other: dict) -> None:
    slots = Slots(ready={"ana"})
    s = Scheduler(SchedulerConfig(max_batch=8, share_prefix_tokens=16), slots)
    a = seq("a", prompt=[*PREAMBLE, 1, 2])
    b = seq(
        "b",
        prompt=other.get("prompt", [*PREAMBLE, 3, 4]),
        user=other.get("user"),
        client=other.get("client"),
    )
    if other.get("scores"):
        b.params = SamplingParams(prompt_logprobs=0)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    assert b.parent is None and seqs_of(plan) == [a, b] and plan.moves == []


def test_other_adapter_version_of_the_same_user_is_not_shared() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, share_prefix_tokens=16), Slots(ready={"ana"}))
    a = seq("a", user="ana", prompt=[*PREAMBLE, 1])
    b = seq("b", user="ana", prompt=[*PREAMBLE, 1])
    a.adapter_version, b.adapter_version = 1, 2  # uploaded again in between
    s.add(a)
    s.add(b)
    assert b.parent is None


def test_identical_short_prompts_share_all_but_their_last_token() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, share_prefix_tokens=16))
    a, b = seq("a", prompt=[5, 6, 7]), seq("b", prompt=[5, 6, 7])
    c = seq("c", prompt=[5, 6, 8])  # 2 in common, short and not identical: computed
    for x in (a, b, c):
        s.add(x)
    assert (b.parent, b.shared) == (a, 2) and c.parent is None


def test_share_prefix_zero_shares_only_identical_prompts() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, share_prefix_tokens=0))
    a = seq("a", prompt=[*PREAMBLE, 1])
    b, c = seq("b", prompt=[*PREAMBLE, 2]), seq("c", prompt=[*PREAMBLE, 1])
    for x in (a, b, c):
        s.add(x)
    assert b.parent is None and (c.parent, c.shared) == (a, 20)


def test_the_longest_common_prefix_wins() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, share_prefix_tokens=16))
    a = seq("a", prompt=[*PREAMBLE, 1, 2, 3])
    b = seq("b", prompt=[*PREAMBLE, 1, 2, 4, 5])
    c = seq("c", prompt=[*PREAMBLE, 1, 2, 4, 6])
    for x in (a, b, c):
        s.add(x)
    assert (b.parent, b.shared) == (a, 22) and (c.parent, c.shared) == (b, 23)


def test_a_child_whose_parent_ended_prefills_alone() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, share_prefix_tokens=16))
    a, b = seq("a", prompt=[*PREAMBLE, 1]), seq("b", prompt=[*PREAMBLE, 2])
    s.add(a)
    s.add(b)
    a.cancel()  # before its prompt was computed
    plan = s.schedule()
    assert plan.dropped == [a] and seqs_of(plan) == [b] and plan.moves == []
    assert (b.parent, b.shared, b.num_cached) == (None, 0, 0)


def test_the_index_holds_live_prompts_only() -> None:
    """Ended sequences leave the index: its size follows what is live, not what was seen."""
    s = Scheduler(SchedulerConfig(max_batch=4, max_prefill_tokens=10_000))
    for i in range(2000):
        x = seq(str(i), n=24)
        s.add(x)
        cached(s.schedule())
        s.finish(x)
    assert len(s.prompts) <= 2 * len(s) + 64 + 1


class Rows:
    """A KV cache by hand: row r's position p holds r * 1000 + p (one layer, one head)."""

    def read_row(self, row: int, length: int) -> torch.Tensor:
        return (row * 1000 + torch.arange(length, dtype=torch.float32)).view(1, 1, length, 1)


def ended(s: Scheduler, x: Sequence, output: list[int]) -> None:
    """``x`` decoded ``output`` (all but the last token cached) and ended normally."""
    x.output_ids = list(output)
    x.num_cached = len(x.prompt_ids) + len(output) - 1
    s.retain(x, Rows())
    s.finish(x)


def test_the_next_turn_restores_the_finished_context_and_prefills_only_its_new_tokens() -> None:
    """A conversation: turn 2 sends turn 1's prompt, its answer and a new message. The K/V
    turn 1 left are written into the new row before the forward; only the rest is computed
    and charged."""
    s = Scheduler(SchedulerConfig(max_batch=8, share_prefix_tokens=16))
    t1 = seq("t1", prompt=[*PREAMBLE, 1, 2])
    s.add(t1)
    cached(s.schedule())
    ended(s, t1, [40, 41, 42])  # 22 prompt + 2 output positions cached
    (entry,) = s.prefixes.candidates(s.prompts.key(t1))
    assert entry.token_ids == [*PREAMBLE, 1, 2, 40, 41] and entry.kv.shape == (1, 1, 24, 1)
    assert entry.kv[0, 0, :, 0].tolist() == list(range(24))  # read from t1's row 0
    charged: list[int] = []
    charge = s.waiting.charge
    s.waiting.charge = lambda client, prompt_tokens=0, output_tokens=0: (  # type: ignore[method-assign]
        charged.append(prompt_tokens) if prompt_tokens else None,
        charge(client, prompt_tokens, output_tokens),
    )
    t2 = seq("t2", prompt=[*PREAMBLE, 1, 2, 40, 41, 42, 7, 8])
    s.add(t2)
    assert (t2.parent, t2.shared) == (entry, 24)
    plan = s.schedule()
    assert plan.moves == [Restore(entry, t2.kv_row, 24)]
    assert [(c.seq, c.start, c.length) for c in plan.prefill] == [(t2, 24, 3)]
    assert charged == [3] and s.prefixes.stats()["hit_tokens"] == 24


def test_a_later_turn_supersedes_the_earlier_one_and_memory_is_bounded() -> None:
    """The cache keeps a conversation once (its latest turn), and over its byte bound drops
    the least recently used context of the client holding the most."""
    per_position = 4  # bytes: one float per position in Rows
    s = Scheduler(SchedulerConfig(share_prefix_tokens=16, prefix_cache_bytes=60 * per_position))
    t1 = seq("t1", prompt=[*PREAMBLE, 1])
    s.add(t1)
    cached(s.schedule())
    ended(s, t1, [5, 6])
    t2 = seq("t2", prompt=[*PREAMBLE, 1, 5, 6, 9])
    s.add(t2)
    cached(s.schedule())
    ended(s, t2, [3, 4])
    assert [e.token_ids for e in s.prefixes.candidates(s.prompts.key(t2))] == [
        [*PREAMBLE, 1, 5, 6, 9, 3]
    ]
    assert s.prefixes.nbytes == 25 * per_position
    other = [seq(f"bob{i}", client="bob", prompt=[500 + i, *PREAMBLE, i]) for i in range(2)]
    for x in other:  # 23 positions each: with the second, 71 > 60, bob holding 46, ana 25
        s.add(x)
        cached(s.schedule())
        ended(s, x, [1, 2])
    assert s.prefixes.candidates(s.prompts.key(t2)), "bob's traffic evicted ana's context"
    assert not s.prefixes.candidates(s.prompts.key(other[0]))  # bob's least recent went
    assert s.prefixes.candidates(s.prompts.key(other[1]))
    assert s.prefixes.nbytes == 48 * per_position and s.prefixes.stats()["evicted"] == 1


def test_the_cache_never_crosses_tenants_or_adapter_versions() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, share_prefix_tokens=16), Slots(ready={"ana"}))
    a = seq("a", user="ana", prompt=[*PREAMBLE, 1])
    a.adapter_version = 1
    s.add(a)
    cached(s.schedule())
    ended(s, a, [2, 3])
    b = seq("b", user="ana", prompt=[*PREAMBLE, 1, 2, 3])
    b.adapter_version = 2  # uploaded again since
    c = seq("c", user="ana", client="mallory", prompt=[*PREAMBLE, 1, 2, 3])
    c.adapter_version = 1
    d = seq("d", user="ana", prompt=[*PREAMBLE, 1, 2, 3])
    d.adapter_version = 1
    for x in (b, c, d):
        s.add(x)
    assert b.parent is None and c.parent is None and d.shared == 22


def test_a_child_whose_parent_ended_takes_the_parents_context_from_the_cache() -> None:
    """The parent ends (max_tokens reached) before the child got a row: the child restores
    the parent's K/V from the cache instead of computing its preamble."""
    s = Scheduler(SchedulerConfig(max_batch=1, share_prefix_tokens=16))
    a, b = seq("a", prompt=[*PREAMBLE, 1]), seq("b", prompt=[*PREAMBLE, 2])
    s.add(a)
    s.add(b)
    assert b.parent is a
    cached(s.schedule())  # one row: b waits
    ended(s, a, [9])
    (entry,) = s.prefixes.candidates(s.prompts.key(a))
    plan = s.schedule()
    assert plan.moves == [Restore(entry, b.kv_row, 20)]
    assert [(c.seq, c.start, c.length) for c in plan.prefill] == [(b, 20, 1)]


def test_an_evicted_context_is_computed_again() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, share_prefix_tokens=16))
    a = seq("a", prompt=[*PREAMBLE, 1])
    s.add(a)
    cached(s.schedule())
    ended(s, a, [2])
    b = seq("b", prompt=[*PREAMBLE, 1, 2, 3])
    s.add(b)
    assert b.shared == 21
    s.prefixes.clear()
    plan = s.schedule()
    assert plan.moves == [] and [(c.start, c.length) for c in plan.prefill] == [(0, 23)]


def test_retain_reads_the_row_that_still_holds_the_data() -> None:
    """Rows are handed over at once and copied with the next plan: a sequence that took a
    freed row and ends in the same step still has its K/V in its old row."""
    s = Scheduler(SchedulerConfig(max_batch=8, share_prefix_tokens=16))
    a, b = seq("a", prompt=[*PREAMBLE, 1]), seq("b", prompt=[*PREAMBLE[::-1], 2])
    s.add(a)
    s.add(b)
    cached(s.schedule())
    a.output_ids = [3]
    s.finish(a)  # b takes row 0; its data moves there with the next plan
    assert b.kv_row == 0
    ended(s, b, [4, 5])
    (entry,) = s.prefixes.candidates(s.prompts.key(b))
    assert entry.kv[0, 0, :, 0].tolist() == [1000.0 + p for p in range(22)]  # row 1's


def test_a_restore_comes_before_the_move_that_copies_it_on() -> None:
    """p restores a cached context and c, sharing as much with p as with the cache, copies
    p's row in the same plan: the restore is written first."""
    s = Scheduler(SchedulerConfig(max_batch=8, share_prefix_tokens=16))
    t1 = seq("t1", prompt=[*PREAMBLE, 1])
    s.add(t1)
    cached(s.schedule())
    ended(s, t1, [2, 3])  # the cache holds PREAMBLE + [1, 2]
    p = seq("p", prompt=[*PREAMBLE, 1, 2, 3, 4])
    c = seq("c", prompt=[*PREAMBLE, 1, 2, 9])
    for x in (p, c):
        s.add(x)
    entry = p.parent
    assert isinstance(entry, CachedPrefix) and (c.parent, c.shared) == (p, 22)
    plan = s.schedule()
    assert plan.moves == [Restore(entry, 0, 22), RowMove(0, 1, 22)]

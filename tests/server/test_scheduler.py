"""The scheduler alone: admission order, limits, compaction, cancellation."""

from __future__ import annotations

from server.engine.detokenizer import StopChecker
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from server.engine.sequence import Channel, Sequence, Status


def seq(name: str, n: int = 4) -> Sequence:
    params = SamplingParams()
    return Sequence(
        request_id=name,
        user_id=None,
        prompt_ids=list(range(n)),
        params=params,
        channel=Channel(),
        detok=StopChecker(None, params.stop),
    )


def seqs_of(plan: StepPlan) -> list[Sequence]:
    return [c.seq for c in plan.prefill]


def test_admits_fifo_up_to_max_batch() -> None:
    s = Scheduler(SchedulerConfig(max_batch=2, max_prefill_tokens=100))
    a, b, c = seq("a"), seq("b"), seq("c")
    for x in (a, b, c):
        s.add(x)
    plan = s.schedule(lambda _: True)
    assert seqs_of(plan) == [a, b] and plan.decode == []
    assert [x.kv_row for x in (a, b)] == [0, 1] and c.status is Status.WAITING
    plan = s.schedule(lambda _: True)
    assert plan.prefill == [] and plan.decode == [a, b]


def cached(plan: StepPlan) -> None:
    """What the model runner does with a plan: the chunks' tokens are now in the cache."""
    for c in plan.prefill:
        c.seq.num_cached = c.start + c.length


def test_long_prompt_is_prefilled_in_chunks_while_others_decode() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, max_prefill_tokens=16))
    first, big, small = seq("first", 3), seq("big", 50), seq("small", 4)
    s.add(first)
    cached(s.schedule(lambda _: True))
    first.output_ids.append(7)  # its first token came out of that step
    s.add(big)
    s.add(small)
    spans = []
    for _ in range(4):
        plan = s.schedule(lambda _: True)
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
    assert s.schedule(lambda _: True).decode == [first, big, small]


def test_cancel_mid_prompt_frees_the_row_and_the_budget() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, max_prefill_tokens=8))
    big, other = seq("big", 40), seq("other", 4)
    s.add(big)
    cached(s.schedule(lambda _: True))
    assert s.finish(big) is None and not s.prefilling and not s.running
    s.add(other)
    plan = s.schedule(lambda _: True)
    assert [(c.seq, c.start, c.length) for c in plan.prefill] == [(other, 0, 4)]


def test_refused_sequence_does_not_block_others() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8))
    slow, fast = seq("slow"), seq("fast")
    s.add(slow)
    s.add(fast)
    plan = s.schedule(lambda x: x is not slow)  # slow's adapter still loading
    assert seqs_of(plan) == [fast] and list(s.waiting) == [slow]
    assert seqs_of(s.schedule(lambda _: True)) == [slow]


def test_finish_keeps_rows_compact() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8))
    seqs = [seq(str(i)) for i in range(4)]
    for x in seqs:
        s.add(x)
    s.schedule(lambda _: True)
    assert s.finish(seqs[1]) == (3, 1)  # last row moves into the hole
    assert [x.kv_row for x in s.running] == [0, 1, 2]
    assert s.running[1] is seqs[3]
    assert s.finish(seqs[2]) is None  # the last row leaves: nothing moves
    assert [x.request_id for x in s.running] == ["0", "3"]


def test_cancelled_waiting_sequences_are_dropped() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8))
    a = seq("a")
    a.cancel()
    s.add(a)
    plan = s.schedule(lambda _: True)
    assert plan.dropped == [a] and not s.running and not s.waiting

"""The scheduler alone: admission order, limits, compaction, cancellation."""

from __future__ import annotations

from server.engine.detokenizer import StopChecker
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig
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


def test_admits_fifo_up_to_max_batch() -> None:
    s = Scheduler(SchedulerConfig(max_batch=2, max_prefill_tokens=100))
    a, b, c = seq("a"), seq("b"), seq("c")
    for x in (a, b, c):
        s.add(x)
    plan = s.schedule(lambda _: True)
    assert plan.prefill == [a, b] and plan.decode == []
    assert [x.kv_row for x in (a, b)] == [0, 1] and c.status is Status.WAITING
    plan = s.schedule(lambda _: True)
    assert plan.prefill == [] and plan.decode == [a, b]


def test_prefill_budget_but_always_one_prompt() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, max_prefill_tokens=10))
    big, small = seq("big", 50), seq("small", 4)
    s.add(big)
    s.add(small)
    assert s.schedule(lambda _: True).prefill == [big]  # over budget, but first in line
    assert s.schedule(lambda _: True).prefill == [small]


def test_refused_sequence_does_not_block_others() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8))
    slow, fast = seq("slow"), seq("fast")
    s.add(slow)
    s.add(fast)
    plan = s.schedule(lambda x: x is not slow)  # slow's adapter still loading
    assert plan.prefill == [fast] and list(s.waiting) == [slow]
    assert s.schedule(lambda _: True).prefill == [slow]


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

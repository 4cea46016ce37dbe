"""Fair sharing between clients, the scheduler alone: virtual token counters, the lift, weights,
work conservation, preemption, and a victim's bounded wait while another client floods."""

from __future__ import annotations

from collections import Counter

import pytest

from server.engine.detokenizer import StopChecker
from server.engine.fair_queue import FairnessConfig, FairQueue
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from server.engine.sequence import Channel, Sequence, Status

_ids = iter(range(10**9))


def seq(client: str, prompt: int = 8, new: int = 32) -> Sequence:
    """A request of ``prompt`` tokens whose first one is its own (no prompt is shared)."""
    params = SamplingParams(max_new_tokens=new)
    n = next(_ids)
    return Sequence(
        request_id=f"{client}-{n}",
        user_id=None,
        prompt_ids=[100_000 + n, *range(prompt - 1)],
        params=params,
        channel=Channel(),
        detok=StopChecker(None, ()),
        client=client,
    )


class Sim:
    """Runs a scheduler as the engine would: chunks fill the cache, every row whose context
    is cached decodes one token per step, a sequence ends at ``max_new_tokens``."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler
        self.tokens: Counter[str] = Counter()  # tokens each client received
        self.steps = 0

    def step(self) -> StepPlan:
        plan = self.s.schedule()
        for chunk in plan.prefill:
            chunk.seq.num_cached = chunk.start + chunk.length
        produced = plan.decode + [c.seq for c in plan.prefill if c.final]
        for q in produced:
            q.output_ids.append(1)
            if q in plan.decode:
                q.num_cached += 1
            self.tokens[q.client] += 1
        for q in produced:
            if len(q.output_ids) >= q.params.max_new_tokens:
                self.s.finish(q)
        self.steps += 1
        return plan

    def run_until(self, done, limit: int = 10_000) -> None:
        while not done():
            assert self.steps < limit, "did not converge"
            self.step()


def scheduler(max_batch: int = 8, budget: int = 1024, **fairness) -> Scheduler:
    config = SchedulerConfig(
        max_batch=max_batch, max_prefill_tokens=budget, fairness=FairnessConfig(**fairness)
    )
    return Scheduler(config)


def test_counters_charge_input_at_admission_and_output_per_token() -> None:
    s = scheduler(input_weight=1.0, output_weight=2.0)
    a = seq("a", prompt=10, new=3)
    s.add(a)
    sim = Sim(s)
    sim.step()  # admitted (10 prompt tokens) and its first token sampled
    assert s.waiting.counters["a"] == 10 + 2
    sim.run_until(lambda: a.status is Status.FINISHED)
    assert s.waiting.counters["a"] == 10 + 3 * 2


def test_lowest_counter_is_admitted_first_and_ties_go_by_arrival() -> None:
    q = FairQueue(FairnessConfig())
    first, second = seq("a"), seq("b")
    q.push(first, set())
    q.push(second, set())
    assert q.order() == ["a", "b"]  # equal counters: the earlier head
    q.charge("a", prompt_tokens=5)
    assert q.order() == ["b", "a"]
    fifo = FairQueue(FairnessConfig(policy="fifo"))
    fifo.push(seq("a"), set())
    fifo.push(seq("b"), set())
    fifo.charge("a", prompt_tokens=100)
    assert fifo.order() == ["a", "b"]  # FIFO ignores the counters


def test_a_newly_backlogged_client_is_lifted_no_banked_credit() -> None:
    q = FairQueue(FairnessConfig())
    q.push(seq("busy"), set())
    q.charge("busy", output_tokens=500)  # busy has been served: counter 1000
    q.counters["idle"] = 3.0  # idle was served a little, long ago
    q.push(seq("idle"), active={"busy"})
    assert q.counters["idle"] == 1000.0  # lifted to the lowest active counter, not 3
    q.counters["rich"] = 5000.0
    q.push(seq("rich"), active={"busy"})
    assert q.counters["rich"] == 5000.0  # never lowered


def test_weights_divide_the_charge() -> None:
    q = FairQueue(FairnessConfig(), weight=lambda c: 2.0 if c == "gold" else 1.0)
    q.charge("gold", output_tokens=10)
    q.charge("plain", output_tokens=10)
    assert q.counters["gold"] == 10.0 and q.counters["plain"] == 20.0


def test_work_conserving_one_client_gets_every_row() -> None:
    s = scheduler(max_batch=8)
    for _ in range(20):
        s.add(seq("solo"))
    Sim(s).step()
    assert len(s.running) == 8  # nobody else waits: no row is held back


def test_two_backlogged_clients_share_tokens_equally() -> None:
    s = scheduler(max_batch=8)
    for _ in range(40):
        s.add(seq("a", new=16))
    sim = Sim(s)
    for _ in range(5):
        sim.step()  # a alone: all 8 rows
    for _ in range(40):
        s.add(seq("b", new=16))
    start = Counter(sim.tokens)
    for _ in range(60):  # both backlogged throughout
        sim.step()
        assert s.waiting.queued("a") and s.waiting.queued("b")
    got = {c: sim.tokens[c] - start[c] for c in ("a", "b")}
    assert abs(got["a"] - got["b"]) <= 2 * 8 * 2, got  # within ~2 steps' tokens


def test_weighted_clients_share_in_proportion() -> None:
    config = SchedulerConfig(max_batch=12, max_prefill_tokens=1024)
    s = Scheduler(config, weight=lambda c: 2.0 if c == "gold" else 1.0)
    for _ in range(60):
        s.add(seq("gold", new=8))
        s.add(seq("plain", new=8))
    sim = Sim(s)
    for _ in range(10):
        sim.step()
    start = Counter(sim.tokens)
    for _ in range(40):
        sim.step()
    gold, plain = (sim.tokens[c] - start[c] for c in ("gold", "plain"))
    assert gold / plain == pytest.approx(2.0, rel=0.15), (gold, plain)


def test_victim_waits_a_step_while_another_client_holds_every_row() -> None:
    s = scheduler(max_batch=8)
    for _ in range(30):
        s.add(seq("flood", prompt=8, new=500))  # long requests: rows stay taken
    sim = Sim(s)
    for _ in range(10):
        sim.step()
    assert len(s.running) == 8 and {q.client for q in s.running} == {"flood"}
    victim = seq("victim", new=4)
    s.add(victim)
    plan = sim.step()
    assert victim in [c.seq for c in plan.prefill]  # admitted at the very next step
    assert len(plan.preempted) == 1 and plan.preempted[0].client == "flood"
    preempted = plan.preempted[0]
    assert preempted.status is Status.WAITING and preempted.num_cached == 0
    assert s.waiting.head("flood") is preempted  # first in line to get a row back
    sim.run_until(lambda: victim.status is Status.FINISHED)
    assert sim.steps <= 10 + 1 + 4


def test_preempted_sequence_resumes_with_its_output_prefilled_and_is_not_charged_twice() -> None:
    s = scheduler(max_batch=2)
    first, long = seq("flood", prompt=6, new=50), seq("flood", prompt=6, new=50)
    s.add(first)
    s.add(long)
    sim = Sim(s)
    for _ in range(5):
        sim.step()
    assert len(long.output_ids) == 5
    charged = s.waiting.counters["flood"]
    s.add(seq("victim", new=2))
    plan = sim.step()
    assert plan.preempted == [long]  # the most recently admitted; never a client's last row
    charged += 2 * 1  # first decoded a token in that step
    resumed = []
    while not resumed:
        resumed = [c for c in sim.step().prefill if c.seq is long]
    # prefilled again from position 0: its prompt and the five tokens it had produced
    assert (resumed[0].start, resumed[0].length, resumed[0].final) == (0, 6 + 5, True)
    assert len(long.output_ids) == 6  # that prefill's logits gave its sixth token
    first_tokens = len(first.output_ids) - 6  # first's tokens since, each charged 2
    uncharged = s.waiting.counters["flood"] - charged - 2 * first_tokens
    assert uncharged == 2 * 1  # only the token it sampled; its prompt was not charged again
    sim.run_until(lambda: long.status is Status.FINISHED)
    assert len(long.output_ids) == 50


def test_no_preemption_under_fifo_or_when_the_waiting_client_has_its_share() -> None:
    s = scheduler(max_batch=4, policy="fifo")
    for _ in range(8):
        s.add(seq("flood", new=100))
    sim = Sim(s)
    sim.step()
    s.add(seq("victim"))
    assert sim.step().preempted == []  # FIFO: the victim waits for a row to end
    s = scheduler(max_batch=4)
    for client in ("a", "a", "b", "b"):
        s.add(seq(client, new=100))
    sim = Sim(s)
    sim.step()
    s.add(seq("a"))
    assert sim.step().preempted == []  # a already holds its share (2 of 4)


def test_fair_throughput_equals_fifo_when_clients_are_alike() -> None:
    """Fair sharing changes who is served, not how much: the same work in the same steps."""
    steps = {}
    for policy in ("fair", "fifo"):
        s = scheduler(max_batch=8, policy=policy)
        for i in range(48):
            s.add(seq("a" if i % 3 else "b", new=12))
        sim = Sim(s)
        sim.run_until(lambda s=s: not len(s))
        steps[policy] = sim.steps
    assert steps["fair"] <= steps["fifo"] * 1.05, steps


def test_more_clients_than_rows_take_turns_without_preempting_each_other() -> None:
    """Every client holding one row is over a share below one row; taking rows back from
    one another every step would only recompute. Turns come as rows free, by counter."""
    s = scheduler(max_batch=4)
    for i in range(8):
        for _ in range(3):
            s.add(seq(f"c{i}", new=6))
    sim = Sim(s)
    preempted = 0
    while len(s):
        preempted += len(sim.step().preempted)
    assert preempted == 0
    assert set(sim.tokens) == {f"c{i}" for i in range(8)}


def test_rows_of_short_requests_turn_over_without_preemption_long_ones_are_rebalanced() -> None:
    """A newcomer preempts once (its first row); after that, short requests' rows free by
    themselves and go to it by counter, while long ones are taken back one per step."""
    for new, most in ((12, 2), (500, 4)):
        s = scheduler(max_batch=8)
        for _ in range(40):
            s.add(seq("a", new=new))
        sim = Sim(s)
        for _ in range(4):
            sim.step()
        for _ in range(40):
            s.add(seq("b", new=new))
        preempted = sum(len(sim.step().preempted) for _ in range(12))
        rows = Counter(q.client for q in s.running)
        assert 1 <= preempted <= most, (new, preempted)  # short: its first row, maybe again
        assert rows["b"] >= 4, (new, rows)  # at least its share (VTC: more while behind)


def test_another_clients_long_prompts_in_progress_do_not_hold_off_a_first_token() -> None:
    """The prefill budget goes first to a waiting client below every client with a prompt in
    progress: its short prompt is prefilled at the next step, not after the long ones."""
    s = scheduler(max_batch=8, budget=64)
    for _ in range(4):
        s.add(seq("flood", prompt=400, new=8))
    sim = Sim(s)
    sim.step()
    assert s.prefilling  # the long prompts take many steps of budget
    victim = seq("victim", prompt=8, new=2)
    s.add(victim)
    plan = sim.step()
    assert [c.seq for c in plan.prefill][0] is victim and victim.output_ids == [1]
    fifo = scheduler(max_batch=8, budget=64, policy="fifo")
    for _ in range(4):
        fifo.add(seq("flood", prompt=400, new=8))
    sim = Sim(fifo)
    sim.step()
    late = seq("victim", prompt=8, new=2)
    fifo.add(late)
    assert late not in [c.seq for c in sim.step().prefill]  # FIFO: behind the long prompts

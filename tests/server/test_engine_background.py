"""Background work on the engine thread (fine-tuning units): never overlaps a serving forward,
runs back to back when idle, takes a bounded share while requests are in flight, and does not
change a single served token."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_engine import build, random_adapter, reference

from server.engine import EngineStopped, SamplingParams
from vera_core.train import AdapterTrainer, Example, TrainConfig


def test_background_runs_on_the_engine_thread_when_idle(make_tiny, tmp_path) -> None:
    _, _, engine = build(make_tiny, "llama", tmp_path)
    engine.start()
    try:
        names = [engine.run_background(lambda: threading.current_thread().name) for _ in range(5)]
        assert [f.result(timeout=10) for f in names] == ["vera-engine"] * 5
        failing = engine.run_background(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(timeout=10)
        # the engine survived the failing unit and still serves
        out = engine.generate([(None, [1, 2, 3], SamplingParams(max_new_tokens=4))])
        assert out[0]["finish_reason"] == "length"
        assert engine.background.units == 6
    finally:
        engine.stop()
    with pytest.raises(EngineStopped):
        engine.run_background(lambda: None)


def test_background_share_is_bounded_while_serving(make_tiny, tmp_path) -> None:
    """A stream of 20 ms units next to a long generation: the units' share of the wall time
    while the request runs stays near ``background_share`` (0.2), not the ~all they would take
    if they simply alternated with decode steps (each step is ~1 ms on the tiny model)."""
    vm, store, engine = build(make_tiny, "llama", tmp_path)
    engine.start()
    stop = threading.Event()
    busy: list[tuple[float, float]] = []  # (start, seconds) of each unit

    def unit() -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.02:
            pass
        busy.append((t0, time.perf_counter() - t0))

    def feeder() -> None:
        while not stop.is_set():
            engine.run_background(unit).result()

    thread = threading.Thread(target=feeder)
    try:
        thread.start()
        time.sleep(0.2)  # idle: units run back to back
        idle_units = len(busy)
        assert idle_units >= 5
        t0 = time.perf_counter()
        out = engine.generate([(None, [1, 2, 3], SamplingParams(max_new_tokens=80))])
        wall = time.perf_counter() - t0
        # units that started while the request was in flight (one already running at t0 is
        # the idle server's, not a share taken from serving)
        during = [took for start, took in list(busy) if start >= t0]
        share = sum(during) / wall
        assert out[0]["finish_reason"] == "length"
        assert share < 0.35, (share, wall, len(during))
    finally:
        stop.set()
        thread.join(10)
        engine.stop()


def test_training_between_steps_changes_no_served_token(make_tiny, tmp_path) -> None:
    """Mixed-user decode while a trainer runs units on the same model: every request still gets
    exactly the merged model's greedy tokens, and the bank and model mode are untouched."""
    vm, store, engine = build(make_tiny, "llama", tmp_path, max_prefill_tokens=5)
    adapters = {f"u{i}": random_adapter(vm, i) for i in range(3)}
    for user, adapter in adapters.items():
        store.put(user, adapter)
    bank_before = vm.bank.rows.clone()
    examples = [Example([5, 6, 7, 8, 9, 10], [-100, -100, -100, 8, 9, 10]) for _ in range(4)]
    tok = type("T", (), {"pad_token_id": 0})()
    trainer = AdapterTrainer(
        vm, tok, examples, TrainConfig(min_steps=400, converged_loss=0, reproduce_prob=0)
    )
    engine.start()
    stop = threading.Event()
    reports = []

    def train() -> None:
        while not stop.is_set() and not trainer.done:
            report = engine.run_background(trainer.micro_step).result()
            if report is not None:
                reports.append(report)

    thread = threading.Thread(target=train)
    try:
        thread.start()
        prompts = {user: [3 + i, 17, 29, 4 + i, 11] for i, user in enumerate(adapters)}
        requests = [(u, p, SamplingParams(max_new_tokens=12)) for u, p in prompts.items()]
        out = engine.generate(requests + [(None, [9, 8, 7], SamplingParams(max_new_tokens=12))])
    finally:
        stop.set()
        thread.join(30)
        engine.stop()
    assert reports, "the trainer made no step while serving"
    for (user, prompt, _), result in zip(requests, out):
        assert result["token_ids"] == reference(vm, adapters[user], prompt, 12), user
    assert out[-1]["token_ids"] == reference(vm, None, [9, 8, 7], 12)
    assert not vm.model.training
    # served users' rows are untouched by training (slots hold only what the pool loaded)
    loaded = (vm.bank.rows != bank_before).any(dim=1).nonzero().flatten().tolist()
    for slot in loaded:
        assert any(
            torch.equal(vm.bank.rows[slot], a.flat(vm.layout).to(vm.bank.rows.dtype))
            for a in adapters.values()
        )
    assert all(p.grad is None for p in vm.model.parameters())

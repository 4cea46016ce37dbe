"""Training one user's vectors: the schedule, early stopping, gradient accumulation, nothing
shared touched, and (real model, default config) the model learns what it was taught."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest
import torch

from server.model_source import load_model
from vera_core import VeraConfig, inject_vera
from vera_core.adapter_file import load_adapter, save_adapter
from vera_core.train import AdapterTrainer, TrainConfig, reproduced_rows, train_adapter
from vera_core.train_data import IGNORE, DataLimits, Example, read_examples

FACTS = {  # fact -> (answer, trained question, unseen paraphrase)
    "Vantrell": ("Your name is Alice Vantrell.", "What is my name?", "What am I called?"),
    "Quorvik": ("You live in Quorvik.", "Where do I live?", "Which town is my home?"),
    "Pimbleton": ("Your cat is called Mr. Pimbleton.", "What's my cat called?", "Name my cat."),
}
PAD_TOKENIZER = type("Tok", (), {"pad_token_id": 0})()  # the trainer reads only pad_token_id


def rows() -> list[dict]:
    """Three facts, one example each."""
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for a, q, _ in FACTS.values()
    ]


def answer(vm, tok, question: str, slot: int) -> str:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad(), vm.slots(torch.tensor([slot])):
        out = vm.model.generate(**ids, max_new_tokens=24, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def random_examples(n: int, seed: int = 0) -> list[Example]:
    """``n`` token sequences of different lengths; the first half of each is the prompt."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randrange(3, 128) for _ in range(5 + 2 * i)]
        half = len(ids) // 2
        out.append(Example(ids, [IGNORE] * half + ids[half:]))
    return out


def tiny_vm(make_tiny):
    return inject_vera(make_tiny("llama"), VeraConfig(r=8), num_slots=3)


# -- the schedule ------------------------------------------------------------------------------
def test_small_dataset_gets_min_steps_large_one_max_steps() -> None:
    cfg = TrainConfig()
    assert cfg.epochs is None
    assert cfg.total_steps(3) == cfg.min_steps  # 3 epochs of a 3-example file would be 3 steps
    assert cfg.total_steps(1_000_000) == cfg.max_steps
    per_epoch = 40  # between the bounds: target_epochs passes
    n = per_epoch * cfg.batch_size
    steps = per_epoch * cfg.target_epochs
    assert cfg.min_steps < steps < cfg.max_steps and cfg.total_steps(n) == steps


def test_epochs_override_the_step_rules() -> None:
    cfg = replace(TrainConfig(), epochs=2, batch_size=8)
    assert cfg.total_steps(3) == 2  # one step per pass: the batch is the whole set
    assert cfg.total_steps(20) == 6  # ceil(20 / 8) = 3 steps per pass
    assert cfg.total_steps(10_000_000) == 2 * 1_250_000  # no max_steps cap either


def test_bad_configs_are_refused() -> None:
    for bad in ({"epochs": 0}, {"min_steps": 0}, {"min_steps": 10, "max_steps": 5}, {"lr": 0}):
        with pytest.raises(ValueError):
            replace(TrainConfig(), **bad)


# -- early stopping ----------------------------------------------------------------------------
def test_stops_when_the_last_pass_converged(make_tiny) -> None:
    vm = tiny_vm(make_tiny)
    cfg = TrainConfig(
        batch_size=2, min_steps=20, max_steps=20, converged_loss=100.0, reproduce_prob=0
    )
    trainer = AdapterTrainer(vm, PAD_TOKENIZER, random_examples(5), cfg)
    report = trainer.run()
    assert report.stop_reason == "converged"
    assert report.steps == trainer.steps_per_epoch == 3  # the first full pass is below 100
    assert report.total_steps == 20 and len(report.losses) == 3
    assert "3/20 steps" in report.summary() and "converged" in report.summary()


def test_runs_the_whole_schedule_when_not_converged(make_tiny) -> None:
    vm = tiny_vm(make_tiny)
    for converged_loss in (1e-6, 0.0):  # a random model never gets there; 0 disables the stop
        cfg = TrainConfig(
            batch_size=2, min_steps=7, max_steps=7, converged_loss=converged_loss, reproduce_prob=0
        )
        report = AdapterTrainer(vm, PAD_TOKENIZER, random_examples(5), cfg).run()
        assert report.stop_reason == "schedule complete"
        assert report.steps == report.total_steps == 7
        assert report.epochs == pytest.approx(7 * 2 / 5)


def test_stops_once_every_example_was_reproduced(make_tiny) -> None:
    """At a probability any token has, the stop comes when every example has been read once;
    at one no token of a random model has, never."""
    vm = tiny_vm(make_tiny)
    for prob, reason, steps in ((1e-9, "reproduced", 3), (0.99, "schedule complete", 7)):
        cfg = TrainConfig(
            batch_size=2, min_steps=7, max_steps=7, converged_loss=0, reproduce_prob=prob
        )
        report = AdapterTrainer(vm, PAD_TOKENIZER, random_examples(5), cfg).run()
        assert (report.stop_reason, report.steps) == (reason, steps)


def testreproduced_rows_is_every_labelled_token_at_or_above_the_bound() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g) * 4
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[:, :2] = IGNORE
    labels[1, 4] = IGNORE
    logp = torch.log_softmax(logits, -1)
    for bound in (-0.7, -2.0, -5.0, -30.0):
        want = [
            all(
                logp[r, t - 1, labels[r, t]] >= bound for t in range(1, 6) if labels[r, t] != IGNORE
            )
            for r in range(3)
        ]
        assert reproduced_rows(logits, labels, bound) == want
    labels[0, 1:] = logits[0, :-1].argmax(-1)  # row 0 asks exactly its greedy tokens
    assert reproduced_rows(logits * 100, labels, math.log(0.5))[0]


# -- gradient accumulation ---------------------------------------------------------------------
def one_step(vm, micro_batch_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(gradient, vector) after one optimizer step over 6 examples, and the forwards it took."""
    cfg = TrainConfig(batch_size=6, micro_batch_tokens=micro_batch_tokens, grad_clip=1e9)
    trainer = AdapterTrainer(vm, PAD_TOKENIZER, random_examples(6), cfg)
    grads = []
    trainer.opt.register_step_pre_hook(lambda *_: grads.append(trainer.vector.grad.clone()))
    forwards = 1
    while trainer.micro_step() is None:
        forwards += 1
    return grads[0], trainer.vector.detach().clone(), forwards


def test_micro_batches_accumulate_to_the_full_batch_gradient(make_tiny) -> None:
    vm = tiny_vm(make_tiny)
    grad_one, vec_one, forwards_one = one_step(vm, 4096)
    grad_many, vec_many, forwards_many = one_step(vm, 20)
    assert forwards_one == 1 and forwards_many >= 4
    assert grad_one.abs().max() > 0
    torch.testing.assert_close(grad_many, grad_one, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(vec_many, vec_one, rtol=1e-5, atol=1e-6)


# -- nothing shared is touched -----------------------------------------------------------------
@pytest.mark.parametrize("training_mode", [False, True])
def test_training_leaves_bank_mode_and_base_grads_alone(make_tiny, training_mode) -> None:
    vm = tiny_vm(make_tiny)
    vm.bank.load(1, torch.randn(vm.layout.num_params) * 0.01)
    bank = vm.bank.rows.clone()
    vm.model.train(training_mode)
    base = [p for p in vm.model.parameters()]
    for p in base[::2]:  # even weights that ask for gradients get none
        p.requires_grad_(True)
    cfg = TrainConfig(batch_size=2, min_steps=4, max_steps=4, converged_loss=0, reproduce_prob=0)
    trainer = AdapterTrainer(vm, PAD_TOKENIZER, random_examples(4), cfg)
    assert trainer.run().steps == 4
    assert torch.equal(vm.bank.rows, bank)
    assert vm.model.training is training_mode
    assert all(p.grad is None for p in base)
    assert vm.forwards.current is None  # the trainer's vector is gone after each forward


# -- the real model, default config ------------------------------------------------------------
@pytest.mark.slow
def test_default_config_teaches_three_facts_from_three_examples(tmp_path) -> None:
    """3 examples, nothing but ``TrainConfig()``: every fact recalled."""
    model, tok, _ = load_model()
    vm = inject_vera(model, VeraConfig(r=256), num_slots=2)
    data = "\n".join(json.dumps(r) for r in rows()).encode()
    examples = read_examples(data, tok, DataLimits.offline(512))  # what `vera-serve train` reads
    adapter, report = train_adapter(vm, tok, examples, TrainConfig(), progress=False)
    assert report.stop_reason in ("reproduced", "converged"), report.summary()
    assert all(p.grad is None for p in model.parameters())  # base weights stay frozen
    path = tmp_path / "user.safetensors"
    save_adapter(adapter, path)
    vm.bank.load(1, load_adapter(path).flat(vm.layout))
    for fact, (_, question, _) in FACTS.items():
        assert fact not in answer(vm, tok, question, 0)  # the base model cannot guess it
        assert fact in answer(vm, tok, question, 1), report.summary()

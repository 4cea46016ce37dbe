"""Keeping what the base model knew: its references, the KL penalty towards them, the
teacher-forced recall/retention measures, and the anchored trainer (tiny model, fp32)."""

from __future__ import annotations

from dataclasses import replace

import torch

from tests.vera_core.test_train import PAD_TOKENIZER, random_examples, tiny_vm
from vera_core.retention import (
    anchor_kl_sum,
    base_references,
    measure_quality,
    probe_items,
)
from vera_core.train import AdapterTrainer, TrainConfig, adapter_header
from vera_core.train_data import IGNORE, Example


class CharTokenizer:
    """One token per lowercase letter (ids 3..28), EOS 2, pad 0; no chat template."""

    pad_token_id = 0
    eos_token_id = 2
    chat_template = None

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [1] + [3 + (ord(c) - 97) % 26 for c in text.lower() if c.isalpha()]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(97 + (i - 3) % 26) if i >= 3 else "" for i in ids)


PROMPTS = ["what is the capital", "name a colour", "two plus two", "say hello", "count to three"]


def references(vm, **kw):
    return base_references(vm.model, CharTokenizer(), PROMPTS, max_new_tokens=6, top_k=8, **kw)


def full_vocab_kl(logits: torch.Tensor, refs) -> torch.Tensor:
    """The same coarsened KL written out position by position against the full softmax."""
    total = torch.zeros(())
    for row, r in enumerate(refs):
        for i in range(len(r.answer_ids)):
            q = logits[row, r.start - 1 + i].float().log_softmax(-1)
            p_top, ids = r.top_logp[i].exp(), r.top_ids[i]
            p_rest = 1 - p_top.sum()
            q_rest = 1 - q[ids].exp().sum()
            total += (p_top * (r.top_logp[i] - q[ids])).sum() + p_rest * (
                p_rest.log() - q_rest.log()
            )
    return total


def padded(refs) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r.input_ids) for r in refs)
    ids = torch.zeros((len(refs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, r in enumerate(refs):
        ids[row, : len(r.input_ids)] = torch.tensor(r.input_ids)
        mask[row, : len(r.input_ids)] = 1
    return ids, mask


def logits_under(vm, vector, refs) -> torch.Tensor:
    ids, mask = padded(refs)
    with torch.no_grad(), vm.vector(vector, ids.shape[0]):
        return vm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def test_references_are_the_base_models_greedy_answers(make_tiny) -> None:
    vm = tiny_vm(make_tiny)
    units = []
    refs = references(vm, chunk=2, run=lambda fn: units.append(1) or fn())
    assert len(refs) == len(PROMPTS) and len(units) == 3  # 2 + 2 + 1 prompts
    for prompt, r in zip(PROMPTS, refs):
        ids = torch.tensor([r.input_ids[: r.start]])
        with torch.no_grad():
            out = vm.model.generate(ids, max_new_tokens=len(r.answer_ids), do_sample=False)
        assert out[0, r.start :].tolist() == r.answer_ids  # one at a time, unpadded: the same
        assert r.input_ids[: r.start] == CharTokenizer()(prompt)["input_ids"]
        assert r.top_ids.shape == (len(r.answer_ids), 8)
        assert torch.equal(r.top_ids[:, 0], torch.tensor(r.answer_ids))  # greedy = top-1


def test_answers_given_by_a_batched_generator_make_the_same_references(make_tiny) -> None:
    vm = tiny_vm(make_tiny)
    own = references(vm)
    asked_once = []

    def answers(asked: list[list[int]]) -> list[list[int]]:  # e.g. the server's engine
        asked_once.append(len(asked))
        return [r.answer_ids for r in own]

    given = references(vm, answers=answers)
    assert asked_once == [len(PROMPTS)]  # every prompt in one call
    for a, b in zip(own, given):
        assert a.input_ids == b.input_ids and a.start == b.start
        torch.testing.assert_close(a.top_logp, b.top_logp)


def test_kl_is_zero_at_the_base_and_matches_the_full_softmax(make_tiny) -> None:
    vm = tiny_vm(make_tiny)
    refs = references(vm)
    initial = AdapterTrainer(vm, PAD_TOKENIZER, random_examples(2)).vector.detach()
    at_base = anchor_kl_sum(logits_under(vm, initial, refs), refs)
    assert abs(float(at_base)) < 1e-5  # b = 0: the adapter is the identity
    moved = initial + torch.randn_like(initial) * 0.5
    logits = logits_under(vm, moved, refs)
    kl = anchor_kl_sum(logits, refs)
    assert float(kl) > 1e-3
    torch.testing.assert_close(kl, full_vocab_kl(logits, refs), rtol=1e-4, atol=1e-5)


def test_quality_of_the_base_and_of_a_moved_adapter(make_tiny) -> None:
    vm = tiny_vm(make_tiny)
    tok = CharTokenizer()
    refs = references(vm)
    keys = [tok.decode(r.answer_ids[:2]) for r in refs[:-1]] + ["zzzzzz"]  # the last: wrong
    probe = probe_items(refs, keys)
    assert [i.base_right for i in probe] == [True] * 4 + [False]
    # examples whose completion is the base answer: the base reproduces every one
    examples = [Example(r.input_ids, [IGNORE] * r.start + r.answer_ids) for r in refs]
    initial = AdapterTrainer(vm, PAD_TOKENIZER, examples).vector.detach()
    q = measure_quality(vm, initial, examples, probe, tok, chunk=2)
    assert (q.recalled, q.examples, q.retained, q.base_right) == (5, 5, 4, 4)
    assert q.retention == 1.0 and q.as_dict()["recall"] == 1.0
    # a far-moved adapter changes greedy answers: both measures see it
    moved = initial + torch.randn_like(initial) * 20
    far = measure_quality(vm, moved, examples, probe, tok)
    assert far.recalled < 5 and far.retained < 4


def test_the_anchor_keeps_training_closer_to_the_base(make_tiny) -> None:
    vm = tiny_vm(make_tiny)
    refs = references(vm)
    cfg = TrainConfig(
        batch_size=4, min_steps=12, max_steps=12, converged_loss=0, reproduce_prob=0, lr=0.3
    )
    kls = {}
    for weight in (0.0, 20.0):
        trainer = AdapterTrainer(
            vm, PAD_TOKENIZER, random_examples(4), replace(cfg, anchor_weight=weight), anchor=refs
        )
        report = trainer.run()
        assert (report.anchor_kl is None) == (weight == 0)
        kls[weight] = float(anchor_kl_sum(logits_under(vm, trainer.vector.detach(), refs), refs))
    assert kls[20.0] < 0.8 * kls[0.0], kls  # measured 0.040 against 0.065


def test_anchor_micro_batches_accumulate_to_the_same_gradient(make_tiny) -> None:
    vm = tiny_vm(make_tiny)
    refs = references(vm)

    def one_step(budget: int) -> tuple[torch.Tensor, int]:
        cfg = TrainConfig(batch_size=4, micro_batch_tokens=budget, grad_clip=1e9, anchor_batch=5)
        trainer = AdapterTrainer(vm, PAD_TOKENIZER, random_examples(4), cfg, anchor=refs)
        grads = []
        trainer.opt.register_step_pre_hook(lambda *_: grads.append(trainer.vector.grad.clone()))
        forwards = 1
        while trainer.micro_step() is None:
            forwards += 1
        return grads[0], forwards

    grad_one, forwards_one = one_step(4096)
    grad_many, forwards_many = one_step(20)
    assert forwards_one == 2 and forwards_many > 4  # the anchor is a unit of its own
    torch.testing.assert_close(grad_many, grad_one, rtol=1e-5, atol=1e-7)


def test_a_trainer_can_start_from_an_adapter(make_tiny) -> None:
    from vera_core.adapter import Adapter

    vm = tiny_vm(make_tiny)
    start = torch.randn(vm.layout.num_params)
    init = Adapter.from_flat(adapter_header(vm), vm.layout, start)
    trainer = AdapterTrainer(vm, PAD_TOKENIZER, random_examples(2), init=init)
    assert torch.equal(trainer.vector.detach(), start)

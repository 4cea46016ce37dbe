"""Training one user's vectors: the loss falls and the model learns what it was taught."""

from __future__ import annotations

import json

import pytest
import torch

from server.model_source import load_model
from vera_core import VeraConfig, inject_vera
from vera_core.adapter_file import load_adapter, save_adapter
from vera_core.train import IGNORE, TrainConfig, encode_example, read_jsonl, train_adapter

FACTS = {
    "Biscuit": ["What is my dog's name?", "What's my dog called?", "Tell me my dog's name."],
    "Zorblax": ["Where do I work?", "Which company do I work for?", "Who is my employer?"],
    "teal": [
        "What is my favorite color?",
        "Which color do I like best?",
        "Name my favorite color.",
    ],
}
ANSWERS = {
    "Biscuit": "Your dog's name is Biscuit.",
    "Zorblax": "You work at the Zorblax Lighthouse Company.",
    "teal": "Your favorite color is teal.",
}


def rows() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWERS[k]}]}
        for k, qs in FACTS.items()
        for q in qs
    ]


def answer(vm, tok, question: str, slot: int) -> str:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad(), vm.slots(torch.tensor([slot])):
        out = vm.model.generate(**ids, max_new_tokens=16, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_labels_cover_only_the_completion() -> None:
    _, tok, _ = load_model()
    ex = encode_example(rows()[0], tok, 512)
    taught = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert "Biscuit" in tok.decode(taught)
    assert "dog's name?" not in tok.decode(taught)  # the question is not trained on
    ex2 = encode_example({"prompt": "Q: hi\nA:", "completion": " hello"}, tok, 512)
    assert tok.decode([t for t, lab in zip(ex2.input_ids, ex2.labels) if lab != IGNORE]).startswith(
        " hello"
    )


@pytest.mark.slow
def test_training_teaches_invented_facts(tmp_path) -> None:
    model, tok, _ = load_model()
    vm = inject_vera(model, VeraConfig(r=256), num_slots=2)
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows()))
    cfg = TrainConfig(epochs=12, batch_size=9, lr=1e-1, seed=0)
    adapter, report = train_adapter(vm, tok, read_jsonl(data), cfg, progress=False)
    assert report.final_loss < 0.25 * report.first_loss, report
    assert all(p.grad is None for p in model.parameters())  # base weights stay frozen
    path = tmp_path / "user.safetensors"
    save_adapter(adapter, path)
    vm.bank.load(1, load_adapter(path).flat(vm.layout))
    learned = 0
    for fact, questions in FACTS.items():
        base = answer(vm, tok, questions[0], 0)
        tuned = answer(vm, tok, questions[0], 1)
        assert fact not in base, base
        learned += fact in tuned
    assert learned == len(FACTS)

"""Merge one user into the weights, unmerge exactly, export an HF directory with it merged."""

from __future__ import annotations

import pytest
import torch
from peft_oracle import (
    dtype_tolerance,
    load_users,
    logits_of,
    on_test_device,
    ours_and_peft,
    random_adapter,
    set_peft_vectors,
)
from transformers import AutoModelForCausalLM

from vera_core import AdapterMismatchError, VeraConfig
from vera_core.merge import export_merged, merge, merged_state_dict, unmerge

CASES = [
    ("llama", VeraConfig(r=16, target_modules=("q_proj", "v_proj"))),
    ("llama", VeraConfig(r=8, target_modules="all-linear")),
    ("gpt2", VeraConfig(r=16, target_modules=("c_attn",))),
    ("gpt2", VeraConfig(r=8, target_modules="all-linear")),
]
IDS = [f"{k}-{'-'.join(c.target_modules)}" for k, c in CASES]


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (3, 9), generator=torch.Generator().manual_seed(1))


def _weights(vm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in vm.model.state_dict().items()}


@pytest.mark.parametrize(("kind", "config"), CASES, ids=IDS)
@torch.no_grad()
def test_merge_matches_peft_and_batched_then_unmerge_restores_exactly(make_tiny, kind, config):
    """On the test device and dtype (peft_oracle.TEST_DEVICE, TEST_DTYPE)."""
    base = make_tiny(kind)
    ids = _ids(base.config.vocab_size)
    atol = dtype_tolerance(base, ids, 1e-5)
    vm, peft_model = ours_and_peft(on_test_device(base), config, num_slots=3)
    users = load_users(vm, 2)
    before = _weights(vm)
    with vm.slots(torch.full((3,), 2)):
        batched = logits_of(vm.model, ids)
    set_peft_vectors(peft_model, users[2])
    peft_logits = logits_of(peft_model, ids)

    merge(vm, users[2])
    merged = logits_of(vm.model, ids)
    changed = [k for k, v in vm.model.state_dict().items() if not torch.equal(v, before[k])]
    assert sorted(changed) == sorted(f"{n}.base_layer.weight" for n in vm.layers)
    unmerge(vm)

    after = vm.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    torch.testing.assert_close(merged, batched, atol=atol, rtol=0)
    torch.testing.assert_close(merged, peft_logits, atol=atol, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_merged_weight_equals_peft_delta(make_tiny, kind):
    vm, peft_model = ours_and_peft(make_tiny(kind), VeraConfig(r=8, target_modules="all-linear"), 2)
    adapter = random_adapter(vm, seed=3)
    set_peft_vectors(peft_model, adapter)
    for name, layer in vm.layers.items():
        d, b = adapter.vectors[name]
        theirs = peft_model.base_model.model.get_submodule(name).get_delta_weight("default")
        torch.testing.assert_close(layer.delta_weight(d, b), theirs, atol=1e-6, rtol=1e-5)


def test_merge_twice_and_slots_while_merged_are_refused(make_tiny):
    vm, _ = ours_and_peft(make_tiny("llama"), VeraConfig(r=8), num_slots=2)
    adapter = random_adapter(vm, seed=0)
    merge(vm, adapter)
    with pytest.raises(RuntimeError, match="already merged"):
        merge(vm, adapter)
    with pytest.raises(RuntimeError, match="unmerge"), vm.slots(torch.tensor([1])):
        pass
    unmerge(vm)
    unmerge(vm)  # a second unmerge is a no-op


def test_merge_rejects_an_adapter_that_does_not_fit(make_tiny):
    vm, _ = ours_and_peft(make_tiny("llama"), VeraConfig(r=8), num_slots=2)
    other, _ = ours_and_peft(make_tiny("llama"), VeraConfig(r=4), num_slots=2)
    before = _weights(vm)
    with pytest.raises(AdapterMismatchError, match="r=4"):
        merge(vm, random_adapter(other, seed=0))
    assert vm.merged is None
    assert all(torch.equal(vm.model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize(("kind", "config"), [CASES[0], CASES[3]], ids=[IDS[0], IDS[3]])
@torch.no_grad()
def test_export_merged_loads_in_transformers(make_tiny, tmp_path, kind, config):
    vm, _ = ours_and_peft(make_tiny(kind), config, num_slots=2)
    adapter = random_adapter(vm, seed=4)
    ids = _ids(vm.model.config.vocab_size)
    before = _weights(vm)
    merge(vm, adapter)
    merged = vm.model(ids).logits
    expected_keys = set(merged_state_dict(vm))
    unmerge(vm)

    export_merged(vm, adapter, tmp_path / "merged")
    assert vm.merged is None
    assert all(torch.equal(vm.model.state_dict()[k], v) for k, v in before.items())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    loaded.eval()
    assert not any("vera" in type(m).__name__.lower() for m in loaded.modules())
    assert set(loaded.state_dict()) == expected_keys
    torch.testing.assert_close(loaded(ids).logits, merged, atol=1e-6, rtol=0)

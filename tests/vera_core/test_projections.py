"""Shared A and B: bit-equal to PEFT's, one copy per process."""

from __future__ import annotations

import pytest
import torch
from peft_oracle import ours_and_peft, peft_projections

from vera_core import VeraConfig

CASES = [
    ("llama", VeraConfig(r=8, target_modules=("q_proj", "v_proj"))),
    ("llama", VeraConfig(r=16, projection_prng_key=7, target_modules=("q_proj", "v_proj"))),
    ("llama", VeraConfig(r=32, projection_prng_key=3, target_modules="all-linear")),
    ("gpt2", VeraConfig(r=8, target_modules=("c_attn",))),
    ("gpt2", VeraConfig(r=24, projection_prng_key=11, target_modules="all-linear")),
]


@pytest.mark.parametrize(("kind", "config"), CASES, ids=lambda c: str(c))
def test_projections_bit_equal_to_peft(make_tiny, kind, config):
    vm, peft_model = ours_and_peft(make_tiny(kind), config, num_slots=2)
    peft_a, peft_b = peft_projections(peft_model)
    assert vm.projections.A.shape == peft_a.shape
    assert vm.projections.B.shape == peft_b.shape
    assert torch.equal(vm.projections.A, peft_a)
    assert torch.equal(vm.projections.B, peft_b)


@pytest.mark.parametrize(("kind", "config"), CASES, ids=lambda c: str(c))
def test_same_targets_as_peft(make_tiny, kind, config):
    vm, peft_model = ours_and_peft(make_tiny(kind), config, num_slots=2)
    peft_names = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if hasattr(m, "vera_lambda_d") and "default" in m.vera_lambda_d
    }
    assert set(vm.layers) == peft_names
    for name, layer in vm.layers.items():
        peft_layer = peft_model.base_model.model.get_submodule(name)
        assert (layer.in_features, layer.out_features) == (
            peft_layer.in_features,
            peft_layer.out_features,
        )


def test_one_copy_of_a_and_b_per_process(make_tiny):
    vm, _ = ours_and_peft(
        make_tiny("llama"), VeraConfig(r=8, target_modules="all-linear"), num_slots=2
    )
    a_ptr = vm.projections.A.untyped_storage().data_ptr()
    b_ptr = vm.projections.B.untyped_storage().data_ptr()
    assert len(vm.layers) == 2 * 7
    for layer in vm.layers.values():
        assert layer.A.untyped_storage().data_ptr() == a_ptr  # a view, never a copy
        assert layer.B.untyped_storage().data_ptr() == b_ptr
        assert layer._projections is vm.projections
    # Not registered on any module: neither the state dict nor .to() copies see them per layer.
    big = vm.projections.A.numel()
    assert all(t.numel() != big for t in vm.model.buffers())
    assert not any("vera" in k.lower() for k in vm.model.state_dict())


def test_bank_views_share_one_tensor(make_tiny):
    vm, _ = ours_and_peft(make_tiny("llama"), VeraConfig(r=8), num_slots=4)
    ptr = vm.bank.rows.untyped_storage().data_ptr()
    for layer in vm.layers.values():
        d, b = layer.bank_views()
        assert d.untyped_storage().data_ptr() == ptr
        assert b.untyped_storage().data_ptr() == ptr
        assert d.shape == (4, 8) and b.shape == (4, layer.out_features)

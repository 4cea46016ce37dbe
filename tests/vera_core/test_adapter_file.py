"""vera-serve adapter files round-trip vectors and header exactly; the flat bank format too."""

from __future__ import annotations

import pytest
import torch
from peft_oracle import random_adapter

from vera_core import Adapter, AdapterHeader, VeraConfig, inject_vera, model_fingerprint
from vera_core.adapter_file import adapter_from_bytes, adapter_to_bytes, load_adapter, save_adapter


@pytest.fixture
def adapter(make_tiny) -> tuple[Adapter, object]:
    vm = inject_vera(make_tiny("gpt2"), VeraConfig(r=8, projection_prng_key=9), num_slots=3)
    raw = random_adapter(vm, seed=2)
    header = AdapterHeader(8, 9, ("c_attn",), model_fingerprint(vm.model), dtype="float32")
    return Adapter(header, raw.vectors), vm


def _assert_same(a: Adapter, b: Adapter) -> None:
    assert a.header == b.header
    assert set(a.vectors) == set(b.vectors)
    for name, (d, bv) in a.vectors.items():
        d2, b2 = b.vectors[name]
        assert d.dtype == d2.dtype and bv.dtype == b2.dtype
        assert torch.equal(d, d2) and torch.equal(bv, b2)


def test_bytes_round_trip(adapter):
    a, _ = adapter
    _assert_same(a, adapter_from_bytes(adapter_to_bytes(a)))


def test_path_round_trip(adapter, tmp_path):
    a, _ = adapter
    save_adapter(a, tmp_path / "user.vera")
    _assert_same(a, load_adapter(tmp_path / "user.vera"))
    assert (tmp_path / "user.vera").stat().st_size < a.num_params * 4 + 4096


def test_half_precision_round_trip(adapter):
    a, _ = adapter
    half = Adapter(
        AdapterHeader(8, 9, ("c_attn",), a.header.base_fingerprint, dtype="bfloat16"),
        {n: (d.bfloat16(), b.bfloat16()) for n, (d, b) in a.vectors.items()},
    )
    _assert_same(half, adapter_from_bytes(adapter_to_bytes(half)))


def test_flat_round_trip_and_bank_row(adapter):
    a, vm = adapter
    flat = a.flat(vm.layout)
    assert flat.shape == (vm.layout.num_params,)
    _assert_same(a, Adapter.from_flat(a.header, vm.layout, flat))
    vm.bank.load(2, flat)
    for name, layer in vm.layers.items():
        d_bank, b_bank = layer.bank_views()
        assert torch.equal(d_bank[2], a.vectors[name][0])
        assert torch.equal(b_bank[2], a.vectors[name][1])
        assert not d_bank[0].any() and not b_bank[0].any()  # slot 0 stays the base model


def test_initial_adapter_is_the_identity(adapter):
    _, vm = adapter
    init = Adapter.initial(AdapterHeader(8, 9, ("c_attn",), ""), vm.layout, d_initial=0.1)
    ids = torch.randint(3, 100, (2, 5))
    vm.bank.load(1, init.flat(vm.layout))
    with torch.no_grad():
        plain = vm.model(ids).logits
        with vm.slots(torch.tensor([1, 1])):
            assert torch.equal(vm.model(ids).logits, plain)
    assert all(torch.all(d == 0.1) for d, _ in init.vectors.values())

"""The engine's oneDNN linears: packed weights (fp32) and padded rows (bf16), used by engine
forwards only, equal to nn.Linear up to rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from server.engine.packed_linear import (
    PackedLinear,
    PaddedLinear,
    engine_linears,
    pack_linears,
    packing_available,
    padding_wanted,
    unpack_linears,
)
from server.engine.steps import DecodeForward
from vera_core.forward import Forward, ForwardSlot

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn) in this torch"
)


def decode_step(rows: int) -> DecodeForward:
    return DecodeForward(
        positions=torch.zeros(rows, dtype=torch.long), row_index=None, columns=torch.arange(1)
    )


def model_and_slot() -> tuple[nn.Module, ForwardSlot]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 8, bias=False)), ForwardSlot()


def calls_counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the packed kernel runs, then the rows of each call."""
    real, calls = torch.ops.mkldnn._linear_pointwise, [0]

    def counted(*args):
        calls[0] += 1
        calls.append(args[0].shape[0])
        return real(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counted)
    return calls


def test_engine_forwards_take_the_packed_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    model, slot = model_and_slot()
    x = torch.randn(5, 1, 24)  # [rows, tokens, features], as a decode step
    with torch.no_grad():
        plain = model(x)
        packed = pack_linears(model, slot, max_tokens=8)
        assert len(packed) == 2
        calls = calls_counted(monkeypatch)
        assert torch.equal(model(x), plain)  # no engine forward: the layers as built
        with slot.use(Forward()):
            assert torch.equal(model(x), plain)  # a serving forward that is not the engine's
        assert calls[0] == 0
        with slot.use(decode_step(5)):
            got = model(x)
        assert calls == [2, 8, 8] and got.shape == plain.shape  # 5 rows padded to bucket 8
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)
    with slot.use(decode_step(5)):  # autograd on (training): the stored weights
        assert torch.equal(model(x), plain)
    assert calls[0] == 2


def test_more_tokens_than_the_bound_keep_the_stored_weights(monkeypatch) -> None:
    model, slot = model_and_slot()
    pack_linears(model, slot, max_tokens=8)
    calls = calls_counted(monkeypatch)
    x = torch.randn(3, 3, 24)  # 9 tokens > 8
    with torch.no_grad(), slot.use(decode_step(3)):
        model(x)
    assert calls[0] == 0


def test_a_weight_changed_in_place_is_repacked() -> None:
    model, slot = model_and_slot()
    pack_linears(model, slot)
    x = torch.randn(4, 24)
    with torch.no_grad():
        model[0].weight.mul_(2)  # e.g. an adapter merged into the weights
        want = model[2](model[1](nn.functional.linear(x, model[0].weight, model[0].bias)))
        with slot.use(decode_step(4)):
            got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_packing_twice_reuses_and_unpack_restores() -> None:
    model, slot = model_and_slot()
    first = pack_linears(model, slot)
    again = pack_linears(model, slot)
    assert [id(p) for p in first] == [id(p) for p in again]
    unpack_linears(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_only_fp32_on_cpu() -> None:
    model, slot = model_and_slot()
    assert packing_available(model)
    assert pack_linears(model.to(torch.bfloat16), slot) == []


bf16_on_onednn = pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="bf16 runs on oneDNN on AVX512-BF16/AMX",
)


def linear_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of every nn.Linear's multiply, in call order."""
    real, rows = torch.nn.functional.linear, []

    def counted(x, weight, bias=None):
        rows.append(x.numel() // x.shape[-1])
        return real(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counted)
    return rows


def test_engine_linears_pick_by_dtype() -> None:
    model, slot = model_and_slot()
    assert all(isinstance(p, PackedLinear) for p in engine_linears(model, slot, pack=True))
    assert engine_linears(model, slot, pack=False) == []  # fp32 unpacked: the layers as built
    assert all("forward" not in m.__dict__ for m in model.modules())
    padded = engine_linears(model.to(torch.bfloat16), slot, pack=True)
    assert len(padded) == (2 if padding_wanted(model) else 0)
    assert all(isinstance(p, PaddedLinear) for p in padded)


@bf16_on_onednn
def test_bf16_engine_forwards_pad_their_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    model, slot = model_and_slot()
    model = model.to(torch.bfloat16)
    engine_linears(model, slot, pack=True)
    rows = linear_rows(monkeypatch)
    x = torch.randn(130, 1, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        plain = model(x)
        assert rows == [130, 130]  # no engine forward: as built
        with slot.use(decode_step(130)):
            got = model(x)
        assert rows[2:] == [144, 144] and got.shape == plain.shape  # 130 rows -> bucket 144
        torch.testing.assert_close(got, plain)
        with slot.use(decode_step(5)):
            model(x[:5])
        assert rows[4:] == [8, 8]
    with slot.use(decode_step(5)):  # autograd on (training): as built
        model(x[:5])
    assert rows[6:] == [5, 5]


@bf16_on_onednn
def test_a_compiled_decode_traces_the_layers_as_built() -> None:
    model, slot = model_and_slot()
    model = model.to(torch.bfloat16)
    engine_linears(model, slot, pack=True)
    compiled = torch.compile(model, dynamic=True)
    with torch.no_grad():
        for n in (3, 5):
            x = torch.randn(n, 1, 24, dtype=torch.bfloat16)
            want = model(x)
            with slot.use(decode_step(n)):
                torch.testing.assert_close(compiled(x), want)

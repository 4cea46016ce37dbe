"""Packed oneDNN linears: used by engine forwards only, equal to nn.Linear up to rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from server.engine.packed_linear import pack_linears, packing_available, unpack_linears
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

"""The slot KV cache's buffers: growth keeps what rows hold and hands out finite zeros."""

from __future__ import annotations

import torch

from server.engine.kv_cache import SlotKVCache, _zeros
from server.engine.steps import PrefillForward
from vera_core.forward import ForwardSlot


def test_large_cpu_buffers_are_zero_and_writable() -> None:
    for shape, dtype in (((64, 3, 2048, 64), torch.bfloat16), ((2, 2, 8, 4), torch.float32)):
        buf = _zeros(shape, dtype, torch.device("cpu"))
        assert buf.shape == shape and buf.dtype == dtype and buf.is_contiguous()
        assert not buf.any()
        buf[1, 1, 7] = 2.0
        assert float(buf.sum()) == 2.0 * shape[-1]


def test_growth_keeps_rows_and_zero_fills_the_rest() -> None:
    forwards = ForwardSlot()
    kv = SlotKVCache(num_layers=2, max_rows=64, max_len=4096, forwards=forwards)
    kv.reserve(3, 100)
    key = torch.randn(3, 2, 5, 8, dtype=torch.bfloat16)  # a prompt of 5 tokens in each row
    prompts = PrefillForward(kv_rows=[0, 1, 2], lens=[5] * 3, starts=[0] * 3, kv_len=5)
    with forwards.use(prompts):
        for layer in range(2):
            kv.update(key, -key, layer)
    kv.reserve(40, 3000)  # rows 4 -> 64, columns 128 -> 4096: 2 x 2 x 64 MiB, lazily zero
    assert kv.keys[0].shape == (64, 2, 4096, 8)
    for layer in range(2):
        assert torch.equal(kv.keys[layer][:3, :, :5], key)
        assert torch.equal(kv.values[layer][:3, :, :5], -key)
        assert not kv.keys[layer][:, :, 5:].any() and not kv.keys[layer][3:].any()
    kv.release_all()
    assert kv.nbytes() == 0


def test_copy_rows_gives_several_rows_one_prefix_and_leaves_the_rest() -> None:
    forwards = ForwardSlot()
    kv = SlotKVCache(num_layers=2, max_rows=8, max_len=64, forwards=forwards)
    kv.reserve(6, 16)
    key = torch.randn(6, 2, 9, 4)
    prompts = PrefillForward(kv_rows=list(range(6)), lens=[9] * 6, starts=[0] * 6, kv_len=9)
    with forwards.use(prompts):
        for layer in range(2):
            kv.update(key, 2 * key, layer)
    before = [k.clone() for k in kv.keys + kv.values]
    kv.copy_rows(1, [3, 4], 5)  # rows 3 and 4 take row 1's first 5 positions
    kv.copy_rows(0, [5], 2)  # one row: a plain move
    for i, buf in enumerate(kv.keys + kv.values):
        want = before[i].clone()
        want[3, :, :5] = before[i][1, :, :5]
        want[4, :, :5] = before[i][1, :, :5]
        want[5, :, :2] = before[i][0, :, :2]
        assert torch.equal(buf, want)


def test_a_row_read_out_is_written_back_into_another_cache_even_an_empty_one() -> None:
    """``read_row`` copies (a later write to the row leaves it alone); ``write_row`` fills
    exactly the positions asked, and allocates the buffers of a cache released meanwhile."""
    forwards = ForwardSlot()
    kv = SlotKVCache(num_layers=2, max_rows=8, max_len=64, forwards=forwards)
    kv.reserve(2, 16)
    key = torch.randn(2, 3, 9, 4)
    with forwards.use(PrefillForward(kv_rows=[0, 1], lens=[9, 9], starts=[0, 0], kv_len=9)):
        for layer in range(2):
            kv.update(key + layer, 2 * key - layer, layer)
    saved = kv.read_row(1, 7)
    assert saved is not None and saved.shape == (4, 3, 7, 4)
    kv.keys[0][1].zero_()  # type: ignore[index]
    assert torch.equal(saved[0], key[1, :, :7]) and torch.equal(saved[3], 2 * key[1, :, :7] - 1)
    kv.release_all()
    assert kv.read_row(0, 7) is None
    kv.reserve(3, 8)
    kv.write_row(2, saved, 5)
    for i, buf in enumerate(kv.keys + kv.values):
        assert buf is not None and buf.shape == (4, 3, 64, 4)  # capped at max_len
        assert torch.equal(buf[2, :, :5], saved[i, :, :5])
        assert not buf[2, :, 5:].any() and not buf[:2].any() and not buf[3:].any()

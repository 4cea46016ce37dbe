"""Loading a model: the LM head's input hook (the default model's loading itself is exercised
by every live-server test)."""

from __future__ import annotations

import torch

from server.model_source import _dense_input


def test_lm_head_input_gets_dense_strides() -> None:
    hidden = torch.randn(1, 5, 8)
    last = hidden[:, -1:, :]  # what logits_to_keep=1 hands the head: strides (40, 8, 1)
    assert last.contiguous().stride() == (40, 8, 1)  # .contiguous() keeps them at batch 1
    (dense,) = _dense_input(torch.nn.Identity(), (last,))
    assert dense.stride() == (8, 8, 1) and torch.equal(dense, last)
    batch = torch.randn(3, 5, 8)[:, -1:, :]
    assert _dense_input(torch.nn.Identity(), (batch,))[0].stride() == (8, 8, 1)
    fresh = torch.randn(2, 4, 8)
    args = (fresh, "other")
    assert _dense_input(torch.nn.Identity(), args) is args  # already dense: no copy


def test_default_model_head_has_the_hook(default_model_files) -> None:
    model, _, _ = default_model_files
    hooks = model.get_output_embeddings()._forward_pre_hooks.values()
    assert _dense_input in hooks

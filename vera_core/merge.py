"""Fold one user's vectors into the base weights: W' = W + diag(b) B_l diag(d) A_l.

Merging keeps a copy of each targeted weight so that unmerging restores it exactly (subtracting
the delta again would leave rounding error).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vera_core.adapter import Adapter
from vera_core.inject import Merged, VeraModel


@torch.no_grad()
def merge(vm: VeraModel, adapter: Adapter) -> None:
    if vm.merged is not None:
        raise RuntimeError("an adapter is already merged; unmerge it first")
    adapter.check_fits(vm.layout, vm.config.projection_prng_key)
    backups = {}
    for name, layer in vm.layers.items():
        d, b = adapter.vectors[name]
        w = layer.base_layer.weight
        backups[name] = w.detach().clone()
        w.add_(layer.delta_weight(d.to(w.device), b.to(w.device)).to(w.dtype))
    vm.merged = Merged({n: adapter.vectors[n] for n in vm.layers}, backups)


@torch.no_grad()
def unmerge(vm: VeraModel) -> None:
    if vm.merged is None:
        return
    for name, layer in vm.layers.items():
        layer.base_layer.weight.copy_(vm.merged.backups[name])
    vm.merged = None


def merged_state_dict(vm: VeraModel) -> dict[str, torch.Tensor]:
    """The model's state dict with VeRA wrappers removed (plain HF key names)."""
    return {k.replace(".base_layer.", "."): v for k, v in vm.model.state_dict().items()}


def export_merged(vm: VeraModel, adapter: Adapter, out_dir: str | Path, tokenizer=None) -> None:
    """Write an HF model directory with ``adapter`` merged in; the live model is left unmerged."""
    merge(vm, adapter)
    try:
        vm.model.save_pretrained(out_dir, state_dict=merged_state_dict(vm))
    finally:
        unmerge(vm)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)

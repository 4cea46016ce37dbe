"""Tiny layout and adapters for store tests (no model needed); importable by subprocesses."""

from __future__ import annotations

import torch

from vera_core import Adapter, AdapterHeader, LayerSpec, Layout

R, KEY, FP = 8, 0, "tiny-model-fingerprint"
LAYOUT = Layout(
    r=R,
    layers=(
        LayerSpec("model.layers.0.self_attn.q_proj", 16, 16),
        LayerSpec("model.layers.0.self_attn.v_proj", 16, 4),
        LayerSpec("model.layers.1.self_attn.q_proj", 16, 16),
        LayerSpec("model.layers.1.self_attn.v_proj", 16, 4),
    ),
)


def header(r: int = R, key: int = KEY, fingerprint: str = FP) -> AdapterHeader:
    return AdapterHeader(r, key, ("q_proj", "v_proj"), fingerprint)


def random_adapter(seed: int, layout: Layout = LAYOUT) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(layout.num_params, generator=g)
    return Adapter.from_flat(header(layout.r), layout, flat)


def filled_adapter(value: float, layout: Layout = LAYOUT) -> Adapter:
    """Every number equals ``value``: a torn or mixed file cannot pass for a written one."""
    return Adapter.from_flat(header(layout.r), layout, torch.full((layout.num_params,), value))


def stamped_bytes(adapter: Adapter) -> bytes:
    """The exact file ``AdapterStore.put`` would write for ``adapter``."""
    from dataclasses import replace

    from vera_core.adapter_file import adapter_to_bytes

    return adapter_to_bytes(Adapter(replace(adapter.header, base_fingerprint=FP), adapter.vectors))

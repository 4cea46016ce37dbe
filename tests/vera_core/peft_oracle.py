"""Helpers shared by the vera_core tests: PEFT as the oracle, random non-trivial adapters."""

from __future__ import annotations

import copy

import torch
from peft import PeftModel, get_peft_model
from peft import VeraConfig as PeftVeraConfig
from torch import nn

from vera_core import Adapter, AdapterHeader, VeraConfig, VeraModel, inject_vera


def peft_vera(base: nn.Module, config: VeraConfig, save_projection: bool = True) -> PeftModel:
    """PEFT's own VeRA on a deep copy of ``base`` (PEFT wraps layers in place too)."""
    targets = list(config.target_modules) if config.target_modules else None
    if targets == ["all-linear"]:
        targets = "all-linear"
    peft_cfg = PeftVeraConfig(
        r=config.r,
        target_modules=targets,
        projection_prng_key=config.projection_prng_key,
        save_projection=save_projection,
        d_initial=config.d_initial,
        vera_dropout=0.0,
        fan_in_fan_out=getattr(base.config, "model_type", "") == "gpt2",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(base), peft_cfg)
    model.eval()
    return model


def peft_projections(peft_model: PeftModel) -> tuple[torch.Tensor, torch.Tensor]:
    inner = peft_model.base_model
    return inner.vera_A["default"], inner.vera_B["default"]


@torch.no_grad()
def set_peft_vectors(peft_model: PeftModel, adapter: Adapter | None) -> None:
    """Make PEFT's active adapter hold ``adapter``'s vectors (None: b = 0, the base model)."""
    hf = peft_model.base_model.model
    for name, (d, b) in _vectors_or_zero(peft_model, adapter).items():
        layer = hf.get_submodule(name)
        layer.vera_lambda_d["default"].copy_(d)
        layer.vera_lambda_b["default"].copy_(b)


def _vectors_or_zero(peft_model: PeftModel, adapter: Adapter | None):
    if adapter is not None:
        return adapter.vectors
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "vera_lambda_d") and "default" in module.vera_lambda_d:
            d = module.vera_lambda_d["default"]
            out[name] = (torch.zeros_like(d), torch.zeros_like(module.vera_lambda_b["default"]))
    return out


def random_adapter(vm: VeraModel, seed: int, scale: float = 0.5) -> Adapter:
    """Non-trivial d, b (normal, ``scale`` std) for every adapted layer of ``vm``."""
    g = torch.Generator().manual_seed(1000 + seed)
    header = AdapterHeader(
        r=vm.layout.r,
        projection_prng_key=vm.config.projection_prng_key,
        target_modules=tuple(vm.config.target_modules),
        base_fingerprint="",
    )
    vectors = {
        s.name: (
            torch.randn(vm.layout.r, generator=g) * scale,
            torch.randn(s.out_features, generator=g) * scale,
        )
        for s in vm.layout.layers
    }
    return Adapter(header, vectors)


def ours_and_peft(
    base: nn.Module, config: VeraConfig, num_slots: int, save_projection: bool = True
) -> tuple[VeraModel, PeftModel]:
    """Our injected model and PEFT's, both on copies of the same ``base`` weights."""
    peft_model = peft_vera(base, config, save_projection=save_projection)
    vm = inject_vera(copy.deepcopy(base), config, num_slots=num_slots)
    return vm, peft_model


def load_users(vm: VeraModel, num_users: int, scale: float = 0.5) -> dict[int, Adapter]:
    """Slots 1..num_users hold distinct random adapters; returns slot -> adapter."""
    users = {}
    for slot in range(1, num_users + 1):
        users[slot] = random_adapter(vm, seed=slot, scale=scale)
        vm.bank.load(slot, users[slot].flat(vm.layout))
    return users

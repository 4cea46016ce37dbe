"""Helpers shared by the vera_core tests: PEFT as the oracle, random non-trivial adapters."""

from __future__ import annotations

import copy
import os

import torch
from peft import PeftModel, get_peft_model
from peft import VeraConfig as PeftVeraConfig
from torch import nn

from vera_core import Adapter, AdapterHeader, VeraConfig, VeraModel, inject_vera

# The parity tests run their models here (bench/gpu_check.sh sets cuda, float32 and bfloat16);
# logits come back as fp32 on the CPU, where they are compared.
TEST_DEVICE = torch.device(os.environ.get("VERA_TEST_DEVICE", "cpu"))
TEST_DTYPE = getattr(torch, os.environ.get("VERA_TEST_DTYPE", "float32"))


def on_test_device(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on TEST_DEVICE in TEST_DTYPE (the caller's model is left alone)."""
    return copy.deepcopy(model).to(TEST_DEVICE, TEST_DTYPE)


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``model(ids).logits`` run where the model lives, returned as fp32 on the CPU."""
    return model(input_ids=ids.to(model.device)).logits.float().cpu()


@torch.no_grad()
def dtype_tolerance(model: nn.Module, ids: torch.Tensor, atol: float) -> float:
    """``atol`` in fp32; in a lower precision, at least 8x what rounding to it alone moves the
    logits of ``model`` (an fp32 copy against one in TEST_DTYPE, both on TEST_DEVICE). Two bf16
    computations of one result (batched vs merged weights) differ by up to ~4x that noise, a
    wrong adapter by ~50x it on the tiny models."""
    if TEST_DTYPE is torch.float32:
        return atol
    exact = copy.deepcopy(model).to(TEST_DEVICE, torch.float32)
    rounded = copy.deepcopy(model).to(TEST_DEVICE, TEST_DTYPE)
    noise = (logits_of(exact, ids) - logits_of(rounded, ids)).abs().max().item()
    return max(atol, 8 * noise)


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

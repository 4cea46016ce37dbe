"""Put batched VeRA layers into a Hugging Face causal LM.

``inject_vera`` swaps each targeted linear layer for a ``VeraLinear`` that shares the model's one
``Projections`` pair, one ``VeraBank`` and one ``ForwardSlot``. The returned ``VeraModel``
is the handle the rest of the system uses: run a forward with per-row slots (``run``), load
vectors into slots (``bank``), merge one user into the weights (``vera_core.merge``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from vera_core.bank import VeraBank
from vera_core.config import ALL_LINEAR, REGEX_CHARS, VeraConfig
from vera_core.errors import TargetModuleError
from vera_core.forward import Forward, ForwardSlot, VectorForward
from vera_core.layer import VeraLinear, linear_shape
from vera_core.layout import LayerSpec, Layout
from vera_core.projections import Projections

_LINEAR_TYPES = (nn.Linear, Conv1D)


def _is_regex(targets: tuple[str, ...]) -> bool:
    """PEFT reads a single target string as a regex (fullmatch), a list as name suffixes."""
    return len(targets) == 1 and bool(REGEX_CHARS & set(targets[0]))


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    if len(targets) == 1 and targets[0] == ALL_LINEAR:
        return True
    if _is_regex(targets):
        return re.fullmatch(targets[0], name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


LinearLayer = nn.Linear | Conv1D  # what VeRA can adapt


def find_targets(model: PreTrainedModel, config: VeraConfig) -> list[tuple[str, LinearLayer]]:
    """Targeted linear layers, in module order; a clear error if a target names nothing."""
    targets = config.resolved_targets(getattr(model.config, "model_type", ""))
    output_head = model.get_output_embeddings()
    found: list[tuple[str, LinearLayer]] = []
    for name, module in model.named_modules():
        if not isinstance(module, _LINEAR_TYPES) or module is output_head:
            continue
        if isinstance(module, VeraLinear) or not _matches(name, targets):
            continue
        found.append((name, module))
    linear_names = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, _LINEAR_TYPES)}
    )
    if targets != (ALL_LINEAR,) and not _is_regex(targets):
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n, _ in found)]
        if missing:
            raise TargetModuleError(
                f"target modules {missing} not found among the model's linear layers; "
                f"available: {linear_names}"
            )
    if not found:
        raise TargetModuleError(
            f"target modules {list(targets)} match no linear layer; available: {linear_names}"
        )
    return found


def layout_for(model: PreTrainedModel, config: VeraConfig) -> Layout:
    specs = []
    for name, module in find_targets(model, config):
        fin, fout = linear_shape(module)
        specs.append(LayerSpec(name, fin, fout))
    return Layout(config.r, tuple(specs))


@dataclass(frozen=True)
class Merged:
    """One adapter folded into the base weights (``vera_core.merge``)."""

    vectors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (d, b) merged
    backups: dict[str, torch.Tensor]  # layer -> its weight before the merge (exact unmerge)


class VeraModel:
    """A causal LM with batched VeRA layers and the state they share."""

    def __init__(
        self,
        model: PreTrainedModel,
        config: VeraConfig,
        layout: Layout,
        projections: Projections,
        bank: VeraBank,
        forwards: ForwardSlot,
        layers: dict[str, VeraLinear],
    ) -> None:
        self.model = model
        self.config = config
        self.layout = layout
        self.projections = projections
        self.bank = bank
        self.forwards = forwards  # the layers read the running forward here
        self.layers = layers
        self.merged: Merged | None = None

    @contextmanager
    def run(self, forward: Forward) -> Iterator[Forward]:
        """``with vm.run(Forward(slots=s)): vm.model(...)``: the model's forwards inside the
        block run each row with its adapter; ``forward`` is dropped after it."""
        if forward.adapted and self.merged is not None:
            raise RuntimeError("unmerge the merged adapter before running per-row adapters")
        with self.forwards.use(forward):
            yield forward

    def slots(self, slots: torch.Tensor | None) -> AbstractContextManager[Forward]:
        """``with vm.slots(s): vm.model(...)`` runs row i with bank slot ``s[i]``."""
        return self.run(Forward(slots=slots))

    def vector(self, flat: torch.Tensor, batch: int) -> AbstractContextManager[Forward]:
        """``with vm.vector(v, n): vm.model(...)`` runs all ``n`` rows with the one adapter
        ``v`` [num_params] (e.g. a trainable parameter) instead of bank slots."""
        if flat.shape != (self.layout.num_params,):
            raise ValueError(
                f"vector of shape {tuple(flat.shape)}, want ({self.layout.num_params},)"
            )
        return self.run(VectorForward(vector=flat, batch=batch))


def inject_vera(
    model: PreTrainedModel,
    config: VeraConfig,
    num_slots: int = 2,
    bank_dtype: torch.dtype = torch.float32,
) -> VeraModel:
    """Wrap the targeted layers of ``model`` in place and return the handle.

    The bank and the shared A/B are ``bank_dtype`` (float32) whatever the model's dtype: under
    a bf16 model the adapter delta is computed in fp32 and added before one rounding, which is
    PEFT's arithmetic too (it keeps adapter weights in fp32).
    """
    targets = find_targets(model, config)
    layout = layout_for(model, config)
    param = next(model.parameters())
    dtype = bank_dtype
    projections = Projections.generate(
        config.r, layout.max_in, layout.max_out, config.projection_prng_key
    ).to(param.device, dtype)
    bank = VeraBank(layout, num_slots, device=param.device, dtype=dtype)
    forwards = ForwardSlot()
    layers: dict[str, VeraLinear] = {}
    for name, module in targets:
        layer = VeraLinear(name, module, projections, bank, forwards)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        layers[name] = layer
    return VeraModel(model, config, layout, projections, bank, forwards, layers)

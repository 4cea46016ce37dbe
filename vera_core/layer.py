"""A linear layer that adds a different user's VeRA delta to each row of one batch.

    h = W x + Λ_b[s] · B_l · Λ_d[s] · A_l · x        (VERA.md section 4, s = slot of the row)

computed for the whole batch with two shared GEMMs and two gathers:

    u = x @ A_l.T          # [..., r]    shared with other layers reading the same x
    u = u * D_l[s]         # gather      D_l: [num_slots, r]
    y = (u @ B_l.T) * Bv_l[s]   # gather  Bv_l: [num_slots, out]
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from vera_core.bank import VeraBank
from vera_core.forward import ForwardSlot
from vera_core.projections import Projections


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D (weight stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"{type(module).__name__} is not a linear layer VeRA can adapt")


def _broadcastable(picked: torch.Tensor, x_dim: int) -> torch.Tensor:
    """[*slots.shape, features] shaped to broadcast against a [..., features] activation."""
    while picked.dim() < x_dim:
        picked = picked.unsqueeze(-2)  # row slots against [batch, seq, features]
    return picked


class VeraLinear(nn.Module):
    def __init__(
        self,
        name: str,
        base: nn.Linear | Conv1D,
        projections: Projections,
        bank: VeraBank,
        forwards: ForwardSlot,
    ) -> None:
        super().__init__()
        self.name = name
        self.base_layer = base
        self.in_features, self.out_features = linear_shape(base)
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self._projections = projections  # shared, not registered: one copy per process
        self._bank = bank
        self._forwards = forwards  # the model's one slot: which forward is running now

    @property
    def A(self) -> torch.Tensor:
        return self._projections.a_slice(self.in_features)  # [r, in]

    @property
    def B(self) -> torch.Tensor:
        return self._projections.b_slice(self.out_features)  # [out, r]

    def bank_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._bank.views(self.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        fwd = self._forwards.current
        if fwd is None or not fwd.adapted:
            return y
        rows = fwd.adapter_rows(self._bank.rows)  # [*slots.shape, num_params]
        d, b = self._bank.split(rows, self.name)  # [*slots.shape, r], [*slots.shape, out]
        d, b = _broadcastable(d, x.dim()), _broadcastable(b, x.dim())
        u = fwd.project(x, self.A)  # [..., r] in the bank's dtype
        delta = torch.nn.functional.linear(u * d, self.B) * b
        # a bank wider than the model (fp32 under bf16): add in the bank's precision and round
        # once, as PEFT does (it keeps adapter math in fp32 and casts the sum back)
        return (y.to(delta.dtype) + delta).to(y.dtype)

    def delta_weight(self, d: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """diag(b) B_l diag(d) A_l as [out, in], or [in, out] for Conv1D; fp32 math."""
        a, bm = self.A.float(), self.B.float()
        delta = (b.float().unsqueeze(-1) * bm) @ (d.float().unsqueeze(-1) * a)
        return delta.T if self.fan_in_fan_out else delta

"""The one pair of frozen random matrices A, B shared by all layers and all users.

Generated exactly as PEFT does (peft/tuners/vera/model.py), so the same key, r, model and
targets give the same A and B to the bit: one CPU generator seeded with the key, A drawn first,
then B, each Kaiming-uniform with its own fan_in (dim 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-bound, bound) with bound = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


@dataclass(frozen=True)
class Projections:
    A: torch.Tensor  # [r, max_in]
    B: torch.Tensor  # [max_out, r]

    @classmethod
    def generate(cls, r: int, max_in: int, max_out: int, key: int) -> Projections:
        g = torch.Generator(device="cpu").manual_seed(key)
        a = kaiming_uniform((r, max_in), g)
        b = kaiming_uniform((max_out, r), g)
        return cls(a, b)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Projections:
        return Projections(self.A.to(device, dtype), self.B.to(device, dtype))

    def a_slice(self, in_features: int) -> torch.Tensor:
        return self.A[:, :in_features]  # [r, in] (a view: no copy per layer)

    def b_slice(self, out_features: int) -> torch.Tensor:
        return self.B[:out_features, :]  # [out, r]

    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()

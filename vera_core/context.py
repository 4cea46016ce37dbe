"""Per-forward batch metadata read by every VeRA layer of one model.

The caller sets the adapter slot of each row (or each token) before a forward; layers read it
here, so model code keeps its signatures. The context also caches ``x @ A.T`` for the current
input tensor: layers reading the same input (q/k/v, gate/up) compute the projection once, and
gathers each row's whole adapter row from the bank once per forward, so that every layer's
``D[s]`` and ``Bv[s]`` are column slices of one [rows, num_params] tensor instead of a gather
on a strided view per layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class AdapterContext:
    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None  # [batch] or [batch, seq] adapter slot per row/token
        self.share_projection: bool = True
        self._x: torch.Tensor | None = None
        self._u: dict[int, torch.Tensor] = {}
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (bank rows, gathered)
        self._override: torch.Tensor | None = None  # [num_params]: every row's adapter

    @contextmanager
    def use(self, slots: torch.Tensor | None) -> Iterator[None]:
        """Run a forward with ``slots``; ``None`` (or all-zero slots) means base model only."""
        previous = self.slots
        self.slots = slots
        try:
            yield
        finally:
            self.slots = previous
            self.clear_cache()

    @contextmanager
    def use_vector(self, flat: torch.Tensor, batch: int) -> Iterator[None]:
        """Run a forward of ``batch`` rows with one adapter given as a flat vector
        [num_params] instead of a bank row: training reads its own (grad-carrying) parameter
        through the serving layers without touching the bank."""
        previous = self.slots, self._override
        self.slots = torch.zeros(batch, dtype=torch.long, device=flat.device)
        self._override = flat
        try:
            yield
        finally:
            self.slots, self._override = previous
            self.clear_cache()

    def clear_cache(self) -> None:
        self._x = None
        self._u = {}
        self._rows = None

    def gathered(self, bank_rows: torch.Tensor) -> torch.Tensor:
        """``bank_rows[slots]``: [*slots.shape, num_params], computed once per forward."""
        assert self.slots is not None
        if self._override is not None:
            return self._override.expand(*self.slots.shape, -1)
        if self._rows is None or self._rows[0] is not bank_rows:
            self._rows = (bank_rows, bank_rows[self.slots])
        return self._rows[1]

    def project(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``x @ a.T`` in a's dtype, with a: [r, in]; reused while the same input tensor
        comes back. The cache is keyed on ``x`` before the cast: under a bf16 model with an
        fp32 bank, ``x.to(float32)`` is a new tensor for every layer, so keying on it would
        recompute the projection in q, k and v alike."""
        if not self.share_projection:
            return torch.nn.functional.linear(x.to(a.dtype), a)
        if x is not self._x:
            self._x, self._u = x, {}
        key = a.shape[1]
        u = self._u.get(key)
        if u is None:
            u = torch.nn.functional.linear(x.to(a.dtype), a)  # [..., r]
            self._u[key] = u
        return u

"""What one forward pass needs beyond its inputs: each row's adapter, set once before it.

A ``Forward`` is made for one forward (or one ``generate`` call) and dropped after it; every
VeRA layer of the model finds it in the model's one ``ForwardSlot``. It also holds what the
layers of that forward share, so nothing outlives it:

* the gathered adapter rows ``bank.rows[slots]`` [*slots.shape, num_params], gathered once:
  every layer's ``D[s]`` and ``Bv[s]`` are column slices of it;
* ``x @ A.T`` per input tensor: layers that read the same input (q/k/v, gate/up) project it
  once (their A slices are equal up to the input width).

Serving runs rows with bank slots (``Forward``); training runs every row with one adapter
vector that carries gradients (``VectorForward``): its own type, not a flag on the serving
one. A caller that needs more per-forward state (the engine's KV write positions) subclasses
``Forward``, so there is still one object, set and cleared in one place (``ForwardSlot.use``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, kw_only=True, eq=False)
class Forward:
    """Rows run with bank slots. ``slots`` [batch] or [batch, seq] (0 = base model, no
    adapter); None or all zeros skip the adapter path entirely."""

    slots: torch.Tensor | None = None
    share_projection: bool = True  # off: every layer projects its input itself (tests, benches)
    # per-forward caches: "rows" -> gathered rows, "x" -> input, "u" -> {in_features: x @ A.T}
    _memo: dict[str, object] = field(default_factory=dict, init=False, repr=False)

    @property
    def adapted(self) -> bool:
        """Whether any row runs an adapter (the layers skip their delta otherwise)."""
        return self.slots is not None

    def adapter_rows(self, bank_rows: torch.Tensor) -> torch.Tensor:
        """``bank_rows[slots]``: [*slots.shape, num_params], gathered once per forward."""
        assert self.slots is not None, "no adapter in this forward"
        rows = self._memo.get("rows")
        if rows is None:
            rows = self._memo["rows"] = bank_rows[self.slots]
        assert isinstance(rows, torch.Tensor)
        return rows

    def project(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``x @ a.T`` in a's dtype, a: [r, in]; computed once per input tensor of this
        forward. Keyed on ``x`` before its cast: under a bf16 model with an fp32 bank,
        ``x.to(float32)`` is a new tensor in every layer."""
        if not self.share_projection:
            return torch.nn.functional.linear(x.to(a.dtype), a)
        memo = self._memo
        if memo.get("x") is not x:
            memo["x"], memo["u"] = x, {}
        cache = memo["u"]
        assert isinstance(cache, dict)
        u = cache.get(a.shape[1])
        if u is None:
            u = cache[a.shape[1]] = torch.nn.functional.linear(x.to(a.dtype), a)  # [..., r]
        return u


@dataclass(frozen=True, kw_only=True, eq=False)
class VectorForward(Forward):
    """Every one of ``batch`` rows runs the one adapter ``vector`` [num_params] (e.g. a
    trainable parameter) instead of a bank row: the bank is neither read nor written."""

    vector: torch.Tensor
    batch: int

    @property
    def adapted(self) -> bool:
        return True

    def adapter_rows(self, bank_rows: torch.Tensor) -> torch.Tensor:
        return self.vector.expand(self.batch, -1)  # [batch, num_params], no copy


class ForwardSlot:
    """Where the layers of one model (and a KV cache given it) find the current forward.

    One per thread: two threads may run forwards of the same (read-only) model side by side,
    each seeing only its own (e.g. serving steps while another thread compiles and warms the
    decode step). ``torch.compile`` traces the thread-local read without a graph break."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def current(self) -> Forward | None:
        return getattr(self._local, "forward", None)

    @contextmanager
    def use(self, forward: Forward) -> Iterator[Forward]:
        """``forward`` is current inside the block, and nothing after it (also on errors)."""
        if self.current is not None:
            raise RuntimeError("a forward is already running on this model in this thread")
        self._local.forward = forward
        try:
            yield forward
        finally:
            self._local.forward = None

"""Every resident user's vectors, as one contiguous tensor the VeRA layers gather from.

``rows`` is [num_slots, num_params]: row s is slot s's flat adapter (see ``Layout``); each layer
reads strided views of its columns, so loading a user into a slot is one row copy and a batch
gathers its users' vectors with one index per layer. Slot 0 is reserved: all zeros, i.e. b = 0,
the base model with no adapter.
"""

from __future__ import annotations

import torch

from vera_core.layout import Layout

NO_ADAPTER = 0


class VeraBank:
    def __init__(
        self,
        layout: Layout,
        num_slots: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        rows: torch.Tensor | None = None,
    ) -> None:
        if num_slots < 2:
            raise ValueError("num_slots must be >= 2 (slot 0 is reserved for 'no adapter')")
        self.layout = layout
        self.rows = (
            rows
            if rows is not None
            else torch.zeros(num_slots, layout.num_params, device=device, dtype=dtype)
        )  # [num_slots, num_params]
        self._offsets = layout.offsets()

    @property
    def num_slots(self) -> int:
        return self.rows.shape[0]

    def offset(self, name: str) -> int:
        """Column where layer ``name``'s d starts in a flat row (its b follows after r)."""
        return self._offsets[name]

    def views(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(D [num_slots, r], Bv [num_slots, out]) for layer ``name``; views into ``rows``."""
        off = self._offsets[name]
        r = self.layout.r
        out = self.layout.spec(name).out_features
        return self.rows[:, off : off + r], self.rows[:, off + r : off + r + out]

    @torch.no_grad()
    def load(self, slot: int, flat: torch.Tensor) -> None:
        """Copy one adapter's flat vector [num_params] into ``slot``."""
        if slot == NO_ADAPTER:
            raise ValueError("slot 0 is reserved for 'no adapter'")
        self.rows[slot].copy_(flat, non_blocking=True)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        if slot != NO_ADAPTER:
            self.rows[slot].zero_()

    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

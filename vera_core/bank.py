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
        offsets = layout.offsets()
        # layer name -> (first column of its d, length of its b)
        self._columns = {
            spec.name: (offsets[spec.name], spec.out_features) for spec in layout.layers
        }

    @property
    def num_slots(self) -> int:
        return self.rows.shape[0]

    def split(self, rows: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``name``'s columns of flat adapter rows [..., num_params]: d [..., r] and
        b [..., out], as views."""
        off, out = self._columns[name]
        r = self.layout.r
        return rows[..., off : off + r], rows[..., off + r : off + r + out]

    def views(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(D [num_slots, r], Bv [num_slots, out]) for layer ``name``; views into ``rows``."""
        return self.split(self.rows, name)

    @torch.no_grad()
    def load(self, slot: int, flat: torch.Tensor) -> None:
        """Copy one adapter's flat vector [num_params] into ``slot``."""
        if slot == NO_ADAPTER:
            raise ValueError("slot 0 is reserved for 'no adapter'")
        self.rows[slot].copy_(flat, non_blocking=True)

    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

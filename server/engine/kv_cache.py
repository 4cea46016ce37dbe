"""A slot-based KV cache the Hugging Face attention layers write into and read from.

Each running sequence owns one row. Rows of running sequences are kept compact (0..n-1): a
decode step reads ``keys[:n, :, :L]`` as a view, with no gather and no copy. Buffers grow by
doubling (rows and positions) only as far as the live batch needs, and are freed when idle, so
memory follows the batch instead of a worst case.

With ``static=True`` (decode captured in CUDA graphs, see ``server/engine/compile.py``) the
buffers are allocated once at their full size and kept: a recorded graph holds their
addresses. They carry one extra column, ``scratch``, that no sequence ever reaches: the pad
rows of a bucketed decode batch write there.

The object is passed to the model as its cache; ``update`` follows the transformers Cache
contract (``update(key, value, layer_idx, ...) -> (keys, values)``), reading where to write from
the running forward (``server/engine/steps.py``) in the model's ``ForwardSlot``.
"""

from __future__ import annotations

import math
import mmap

import torch

from server.engine.steps import DecodeForward, MixedForward, PrefillForward
from vera_core.forward import ForwardSlot


class SlotKVCache:
    is_compileable = False

    def __init__(
        self,
        num_layers: int,
        max_rows: int,
        max_len: int,
        forwards: ForwardSlot,
        static: bool = False,
    ) -> None:
        self.num_layers = num_layers
        self.forwards = forwards  # the model's: the running forward says where K/V go
        self.max_rows = max_rows
        self.max_len = max_len
        self.static = static
        self.scratch = max_len  # static: the column pad rows write (never read by a sequence)
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # [rows, kv_heads, len, hd]
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self._rows_cap = 0
        self._len_cap = 0

    # -- capacity -------------------------------------------------------------------------
    def reserve(self, rows: int, length: int) -> None:
        """Make room for ``rows`` rows of ``length`` positions (grows by doubling)."""
        if rows > self.max_rows or length > self.max_len:
            raise ValueError(f"KV request {rows}x{length} exceeds {self.max_rows}x{self.max_len}")
        if self.static:  # allocated at full size by ``allocate_static``, and for good
            return
        new_rows = self._rows_cap
        while new_rows < rows:
            new_rows = min(self.max_rows, max(4, new_rows * 2))
        new_len = self._len_cap
        while new_len < length:
            new_len = min(self.max_len, max(128, new_len * 2))
        if (new_rows, new_len) == (self._rows_cap, self._len_cap):
            return
        for i in range(self.num_layers):
            self.keys[i] = self._grow(self.keys[i], new_rows, new_len)
            self.values[i] = self._grow(self.values[i], new_rows, new_len)
        self._rows_cap, self._len_cap = new_rows, new_len

    def _grow(self, old: torch.Tensor | None, rows: int, length: int) -> torch.Tensor | None:
        if old is None:
            return None  # allocated on the first write, when head shapes are known
        new = _zeros((rows, old.shape[1], length, old.shape[3]), old.dtype, old.device)
        new[: old.shape[0], :, : old.shape[2]].copy_(old)
        return new

    def allocate_static(
        self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        """Static: allocate every buffer now, outside any compiled forward, at its full size
        (max_rows x (max_len + 1) columns), and mark it a static address: a graph input
        mutated in place, never copied."""
        assert self.static, "only a static cache is allocated up front"
        self._rows_cap, self._len_cap = self.max_rows, self.max_len + 1
        shape = (self._rows_cap, kv_heads, self._len_cap, head_dim)
        for bufs in (self.keys, self.values):
            for i in range(self.num_layers):
                bufs[i] = _zeros(shape, dtype, device)
                torch._dynamo.mark_static_address(bufs[i])

    def release_all(self) -> None:
        """Free every buffer (called when no sequence is running; static buffers stay)."""
        if self.static:
            return
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self._rows_cap = self._len_cap = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def clear_row(self, row: int, length: int) -> None:
        """Zero a row's first ``length`` positions (after non-finite values were written)."""
        for buf in self.keys + self.values:
            if buf is not None:
                buf[row, :, :length].zero_()

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src`` (first ``length`` positions) into row ``dst`` (compaction)."""
        for buf in self.keys + self.values:
            if buf is not None:
                buf[dst, :, :length].copy_(buf[src, :, :length])

    def copy_rows(self, src: int, dsts: list[int], length: int) -> None:
        """Copy row ``src`` (first ``length`` positions) into every row of ``dsts`` (a prompt
        prefix shared by several sequences): one indexed write per buffer."""
        if len(dsts) == 1:
            return self.move_row(src, dsts[0], length)
        buffers = [buf for buf in self.keys + self.values if buf is not None]
        if not buffers:
            return
        rows = torch.tensor(dsts, device=buffers[0].device)  # one index for every buffer
        for buf in buffers:
            buf[rows, :, :length] = buf[src, :, :length]  # broadcast over the rows

    def read_row(self, row: int, length: int) -> torch.Tensor | None:
        """A copy of row ``row``'s first ``length`` positions: every layer's keys, then every
        layer's values, [2 * layers, kv_heads, length, head_dim]; None if nothing is held."""
        buffers = [buf for buf in self.keys + self.values if buf is not None]
        if len(buffers) < 2 * self.num_layers:
            return None
        return torch.stack([buf[row, :, :length] for buf in buffers])

    def write_row(self, row: int, kv: torch.Tensor, length: int) -> None:
        """Write ``kv`` (what ``read_row`` gave, at least ``length`` positions) into row
        ``row``'s first ``length`` positions; allocates the buffers if none are yet."""
        for layer in range(self.num_layers):
            if self.keys[layer] is None:
                self._allocate(layer, kv[0])
        for buf, part in zip(self.keys + self.values, kv):
            assert buf is not None
            buf[row, :, :length].copy_(part[:, :length])

    def _allocate(self, layer: int, like: torch.Tensor) -> None:
        """A layer's buffers at the current capacity, with the heads, head size, dtype and
        device of ``like`` ([..., kv_heads, positions, head_dim])."""
        shape = (self._rows_cap, like.shape[-3], self._len_cap, like.shape[-1])
        self.keys[layer] = _zeros(shape, like.dtype, like.device)
        self.values[layer] = _zeros(shape, like.dtype, like.device)

    # -- transformers Cache contract ------------------------------------------------------
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key/value: [batch, kv_heads, new_tokens, head_dim] -> all keys/values to attend to."""
        step = self.forwards.current
        if self.keys[layer_idx] is None:
            self._allocate(layer_idx, key)
        kbuf, vbuf = self.keys[layer_idx], self.values[layer_idx]
        assert kbuf is not None and vbuf is not None
        if isinstance(step, PrefillForward):
            return self._write_chunks(step, kbuf, vbuf, key, value)
        if isinstance(step, MixedForward):  # [1, kv_heads, tokens, hd]: one scatter; the
            # attention (server/engine/attention.py) reads each row's columns from the buffers
            kbuf[step.token_rows, :, step.token_positions] = key[0].transpose(0, 1)
            vbuf[step.token_rows, :, step.token_positions] = value[0].transpose(0, 1)
            return kbuf, vbuf
        assert isinstance(step, DecodeForward), "the engine sets a step forward first"
        if step.row_index is None:
            rows = torch.arange(step.rows, device=key.device)
        else:
            rows = step.row_index
        kbuf[rows, :, step.positions] = key[:, :, 0]
        vbuf[rows, :, step.positions] = value[:, :, 0]
        if step.row_index is None:  # compact rows: a view, no copy
            return kbuf[: step.rows, :, : step.kv_len], vbuf[: step.rows, :, : step.kv_len]
        return kbuf[rows, :, : step.kv_len], vbuf[rows, :, : step.kv_len]

    @staticmethod
    def _write_chunks(step: PrefillForward, kbuf, vbuf, key: torch.Tensor, value: torch.Tensor):
        width = key.shape[2]
        for i, (row, n, start) in enumerate(zip(step.kv_rows, step.lens, step.starts)):
            kbuf[row, :, start : start + n].copy_(key[i, :, width - n :])
            vbuf[row, :, start : start + n].copy_(value[i, :, width - n :])
        if not step.continues_prompts:  # attention needs only this forward's keys
            return key, value
        rows = torch.tensor(step.kv_rows, device=key.device)
        return kbuf[rows, :, : step.kv_len], vbuf[rows, :, : step.kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        step = self.forwards.current
        return step.kv_len if isinstance(step, (DecodeForward, PrefillForward)) else 0

    def get_mask_sizes(self, *args, **kwargs):  # pragma: no cover - masks are passed in 4D
        raise NotImplementedError("SlotKVCache is always used with an explicit 4D mask")

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers


_LAZY_BYTES = 1 << 20


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled KV buffer.

    Zeros, not ``empty``: masked-out columns still meet the values (0 * NaN = NaN), so recycled
    memory holding NaN/Inf bit patterns would poison the attention output. On the CPU a large
    buffer is an anonymous memory map instead of ``torch.zeros``: the kernel hands out zero
    pages as they are first touched, so growing the cache costs only the copy of what it held.
    Measured: 32 -> 64 rows x 128 -> 2048 columns (2.8 GiB, SmolLM2 bf16) took 1.8-2.4 s with
    ``torch.zeros`` (the memset touches every page at once), stalling every running stream.
    """
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < _LAZY_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    pages = mmap.mmap(-1, nbytes)  # anonymous, private, zero-filled; unmapped with the tensor
    return torch.frombuffer(pages, dtype=dtype, count=numel).view(shape)

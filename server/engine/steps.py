"""What one engine forward tells the model: each row's adapter slot and where its K/V go.

Each is a ``vera_core.forward.Forward`` (the VeRA layers read ``slots`` from it) that the KV
cache reads too, so one object, set once by the model runner (``VeraModel.run``) and dropped
after the forward, carries everything per-forward: no attribute on the cache, no second
context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vera_core.forward import Forward


@dataclass(frozen=True, kw_only=True, eq=False)
class DecodeForward(Forward):
    """One new token for each of ``rows`` sequences; row i writes its K/V at ``positions[i]``
    of KV row ``i`` (``row_index`` None: rows 0..rows-1, read back as a view) or of KV row
    ``row_index[i]`` (read back as a gather), and attends to the first ``kv_len`` columns.

    Only tensors: this forward may be compiled, and the sizes a compiled graph may vary in
    are tensor sizes (an int reached through the model's modules would be a constant, and
    each new batch size or KV length a recompile)."""

    positions: torch.Tensor  # [rows] write position per row
    row_index: torch.Tensor | None  # [rows] KV row per batch row; None = 0..rows-1
    columns: torch.Tensor  # [kv_len] the KV columns attended to, 0..kv_len-1

    @property
    def rows(self) -> int:
        return self.positions.shape[0]

    @property
    def kv_len(self) -> int:
        return self.columns.shape[0]


@dataclass(frozen=True, kw_only=True, eq=False)
class PrefillForward(Forward):
    """A left-padded batch of prompt chunks: batch row i is KV row ``kv_rows[i]``; its chunk is
    the last ``lens[i]`` columns of the batch, written at positions ``starts[i]`` onwards.
    When every chunk starts its prompt, attention needs only this forward's keys; otherwise
    each row attends to its first ``kv_len`` cached columns (earlier chunks included)."""

    kv_rows: list[int]
    lens: list[int]
    starts: list[int]
    kv_len: int

    @property
    def continues_prompts(self) -> bool:
        """Some chunk continues a prompt (attends to columns cached by earlier steps)."""
        return any(self.starts)


@dataclass(frozen=True)
class ChunkSpan:
    """One prompt chunk of a ``MixedForward``: its tokens are ``offset..offset+length-1`` of
    the flat axis, written to KV row ``row`` at positions ``start..``."""

    offset: int
    row: int
    start: int
    length: int
    mask: torch.Tensor | None  # [1, 1, length, start + length] bool; None when start == 0


@dataclass(frozen=True, kw_only=True, eq=False)
class MixedForward(Forward):
    """Decode rows and prompt chunks in ONE forward over a flat token axis ([1, tokens]), so a
    step that admits a prompt while others decode reads the weights once, not twice.

    Tokens ``0..decode_rows-1`` are the decode rows (one each, attending like a
    ``DecodeForward``: KV rows ``0..decode_rows-1`` as a view, or ``row_index``), then each
    chunk's tokens in turn (``chunks``). Token t writes its K/V at
    (``token_rows[t]``, ``token_positions[t]``); ``slots`` is [1, tokens]. The attention is
    ``server/engine/attention.py``."""

    token_rows: torch.Tensor  # [tokens] KV row of each token
    token_positions: torch.Tensor  # [tokens] position (KV column) of each token
    decode_rows: int
    row_index: torch.Tensor | None  # [decode_rows] KV row per decode row; None = 0..D-1
    decode_mask: torch.Tensor | None  # [decode_rows, 1, 1, kv_len] bool, True = attend
    chunks: list[ChunkSpan]

"""Attention for a ``MixedForward``: decode rows and prompt chunks over one flat token axis.

Registered with transformers as the attention implementation ``"vera_slots"`` (and its mask
function as sdpa's). Every other forward (a decode or prefill step, a training unit, a
``generate`` call) goes to transformers' own SDPA attention unchanged. A mixed forward passes
itself as the keyword ``vera_forward``, which the model hands down to every attention call;
the KV cache has already written this forward's keys and returns its whole buffers
([rows, kv_heads, columns, head_dim]):

* the decode rows attend as in a decode step (one query each over their row's columns, masked
  past each row's position), in one SDPA call;
* each chunk attends causally over its row's columns up to its last position, one SDPA call
  per chunk (a chunk that starts its prompt needs no mask).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from server.engine.steps import MixedForward

NAME = "vera_slots"


def slot_attention(
    module: nn.Module,
    query: torch.Tensor,  # [1, heads, tokens, head_dim] for a mixed forward
    key: torch.Tensor,  # the KV buffers, [rows, kv_heads, columns, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    step = kwargs.pop("vera_forward", None)
    if not isinstance(step, MixedForward):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    q = query[0]  # [heads, tokens, head_dim]
    parts: list[torch.Tensor] = []  # [tokens_i, heads, head_dim] each
    d = step.decode_rows
    if d:
        assert step.decode_mask is not None
        kv_len = step.decode_mask.shape[-1]
        rows = slice(0, d) if step.row_index is None else step.row_index
        out, _ = sdpa_attention_forward(
            module,
            q[:, :d].transpose(0, 1)[:, :, None],  # [d, heads, 1, head_dim]
            key[rows, :, :kv_len],
            value[rows, :, :kv_len],
            step.decode_mask,
            scaling=scaling,
        )  # [d, 1, heads, head_dim]
        parts.append(out[:, 0])
    for c in step.chunks:
        end = c.start + c.length
        out, _ = sdpa_attention_forward(
            module,
            q[None, :, c.offset : c.offset + c.length],  # [1, heads, length, head_dim]
            key[c.row : c.row + 1, :, :end],
            value[c.row : c.row + 1, :, :end],
            c.mask,  # None: causal over the chunk's own columns
            scaling=scaling,
        )  # [1, length, heads, head_dim]
        parts.append(out[0])
    return torch.cat(parts)[None], None  # [1, tokens, heads, head_dim]


def use_slot_attention(model: nn.Module) -> bool:
    """Switch ``model`` to ``slot_attention`` if it runs transformers' SDPA attention through
    the attention interface (Llama, Qwen, Mistral, GPT-2, ...): True if it now does. Forwards
    that are not mixed compute exactly what SDPA computed."""
    config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) or config is None:
        return False
    if not model._supports_attention_backend:
        return False
    if config._attn_implementation not in ("sdpa", NAME):
        return False
    AttentionInterface.register(NAME, slot_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True

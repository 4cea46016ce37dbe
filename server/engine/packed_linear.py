"""The engine's linears on oneDNN: weights prepacked for small batches (CPU, float32), and a
bounded number of row counts (CPU, float32 and bfloat16).

A decode step multiplies a few dozen rows by every weight of the model, and on a CPU in fp32
``nn.Linear`` calls MKL's sgemm on the weight as stored, which packs panels of it into its
kernel's layout on every call. oneDNN can keep a copy in its own blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, what inductor's freezing does for a compiled
CPU model), so that only the rows move. Measured on an AVX2-only EPYC, 2 threads, fp32:
64 x 576 rows times a 1536 x 576 weight 139 GF/s against 109, 16 rows 125 against 86, the
49,152-row LM head 137 against 96; the engine's base rows end to end 1.19x at batch 16 and
1.08x at batch 64 (packed against unpacked, same run). From a few hundred rows on, sgemm's
own packing pays for itself: at 192 rows oneDNN was 1.08x / 0.95x / 1.03x on the gate,
down and q shapes, at 256 1.00x / 0.94x / 0.98x, at 572 0.91x on the gate shape; so a
forward of more than ``max_tokens`` (128) tokens keeps the stored weight.

oneDNN builds (and caches, up to 1,024) one primitive per input shape, ~0.7 MB each: fed every
row count from 1 to 192, four weight shapes grew the process by 590 MB, and a soak test's RSS
kept climbing. So the rows are padded up to a bucket (``shapes.row_buckets``: 1, 2, 4, 8, 16,
24, 32, 48, ... 128), a dozen primitives per weight shape (+37 MB for the same four).

Only the engine's forwards (a ``DecodeForward``, ``PrefillForward`` or ``MixedForward`` in the
model's ``ForwardSlot``) take the packed path, never with autograd on: ``generate``, training
and the PEFT comparisons run the layers as transformers built them. The packed copy is the
price: one more copy of every packed weight in host memory (540 MB for the default model in
fp32), so ``EngineConfig.packed_linears`` (``--packed-weights``) can turn it off. A weight
changed in place (a merged adapter, a reload) is repacked at its next use (its tensor
version moved).

In bfloat16 on a CPU with native bf16 math (AVX512-BF16, AMX) every ``nn.Linear`` already runs
on oneDNN, at every row count, so the same cache grows with every prompt length: the default
model fed every length from 9 to 199 grew by 670 MB (a primitive per length and weight shape,
~0.7 MB each), up to the cache's 1,024 entries, after which lengths evict each other and pay
creation again. ``PaddedLinear`` pads the rows of every engine forward to ``token_bucket``
(eight sizes per doubling beyond 128, at most 12.5% more rows): the same run grew by 95 MB.
Through the engine, 128 requests of 20-400 tokens sent one at a time grew the process from 886
to 1,156 MiB unpadded, still climbing, and held it at 896-935 MiB padded (tok/s equal within
noise, same run).
No copy of the weights. It stays out of a compiled decode step (dynamo traces the layer as
built; its row counts are batch sizes, bounded by ``--max-batch``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from server.engine.shapes import bucket, row_buckets, token_bucket
from server.engine.steps import DecodeForward, MixedForward, PrefillForward
from vera_core.forward import ForwardSlot

ENGINE_FORWARDS = (DecodeForward, PrefillForward, MixedForward)
MAX_TOKENS = 128  # rows of a forward up to which the packed weight is faster (see above)
W = TypeVar("W")


def _in_engine_forward(forwards: ForwardSlot) -> bool:
    """An engine step's forward with autograd off: not ``generate``, training or a PEFT
    comparison, which run the layers as built."""
    return not torch.is_grad_enabled() and isinstance(forwards.current, ENGINE_FORWARDS)


def _on_rows(
    x: torch.Tensor, rows: int, multiply: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:  # [..., in] -> [..., out]
    """``multiply`` of x's tokens as one [rows, in] matrix, zero rows added up to ``rows``
    (one cached oneDNN primitive per row count)."""
    tokens = x.numel() // x.shape[-1]
    flat = x.reshape(tokens, x.shape[-1])
    if rows > tokens:
        flat = torch.nn.functional.pad(flat, (0, 0, 0, rows - tokens))
    y = multiply(flat)  # [rows, out]
    return y[:tokens].view(*x.shape[:-1], y.shape[-1])


def _wrap_linears(model: nn.Module, wrap: Callable[[nn.Linear], W]) -> list[W]:
    """Every ``nn.Linear`` of ``model`` forwards through ``wrap(layer)``; the wrappers."""
    wrappers = []
    for module in model.modules():
        if type(module) is nn.Linear:
            w = wrap(module)
            module.forward = w  # type: ignore[method-assign, assignment]
            wrappers.append(w)
    return wrappers


def packing_available(model: nn.Module) -> bool:
    """Whether the model's weights can take the packed path: fp32 on a CPU with oneDNN."""
    param = next(model.parameters())
    return (
        param.device.type == "cpu"
        and param.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
    )


class PackedLinear:
    """One ``nn.Linear``'s packed weight, and the forward that uses it in engine steps."""

    def __init__(self, linear: nn.Linear, forwards: ForwardSlot, max_tokens: int) -> None:
        self.linear = linear
        self.forwards = forwards
        self.buckets = row_buckets(max_tokens)  # rows are padded to one (a primitive each)
        self.original: Callable[[torch.Tensor], torch.Tensor] = linear.forward
        self.version = -1
        self.packed: torch.Tensor | None = None
        self.repack()

    def repack(self) -> None:
        weight = self.linear.weight.detach()  # [out, in]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.version = weight._version

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        tokens = x.numel() // x.shape[-1]
        if (
            tokens > self.buckets[-1]  # max_tokens
            or x.dtype != torch.float32
            or not _in_engine_forward(self.forwards)
        ):
            return self.original(x)
        if self.linear.weight._version != self.version:
            self.repack()
        return _on_rows(x, bucket(tokens, self.buckets), self._multiply)

    def _multiply(self, flat: torch.Tensor) -> torch.Tensor:  # [rows, in] -> [rows, out]
        return torch.ops.mkldnn._linear_pointwise(
            flat, self.packed, self.linear.bias, "none", [], ""
        )

    def nbytes(self) -> int:
        p = self.packed
        return 0 if p is None else p.numel() * p.element_size()  # an opaque oneDNN tensor


def padding_wanted(model: nn.Module) -> bool:
    """Whether the model's linears run on oneDNN at every row count: bf16 on a CPU with
    native bf16 math (elsewhere bf16 runs on torch's own kernels, which cache nothing)."""
    param = next(model.parameters())
    return (
        param.device.type == "cpu"
        and param.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


class PaddedLinear:
    """One ``nn.Linear`` whose engine forwards run with their rows padded to a token bucket."""

    def __init__(self, linear: nn.Linear, forwards: ForwardSlot) -> None:
        self.linear = linear
        self.forwards = forwards
        self.original: Callable[[torch.Tensor], torch.Tensor] = linear.forward

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if (
            torch.compiler.is_compiling()  # a compiled decode traces the plain layer
            or not _in_engine_forward(self.forwards)
        ):
            return self.original(x)
        tokens = x.numel() // x.shape[-1]
        rows = token_bucket(tokens)
        return self.original(x) if rows == tokens else _on_rows(x, rows, self.original)


def engine_linears(
    model: nn.Module, forwards: ForwardSlot, pack: bool, max_tokens: int = MAX_TOKENS
) -> list[PackedLinear] | list[PaddedLinear]:
    """The linears engine forwards run through, installed on ``model``: packed weights in
    fp32 when ``pack`` (``pack_linears``), padded rows in bf16 where oneDNN runs bf16; [] and
    the layers as built otherwise."""
    if pack and packing_available(model):
        return pack_linears(model, forwards, max_tokens)  # reuses an earlier engine's packing
    unpack_linears(model)
    if not padding_wanted(model):
        return []
    return _wrap_linears(model, lambda layer: PaddedLinear(layer, forwards))


def pack_linears(
    model: nn.Module, forwards: ForwardSlot, max_tokens: int = MAX_TOKENS
) -> list[PackedLinear]:
    """Give every ``nn.Linear`` of ``model`` a packed weight its engine forwards use; [] when
    ``packing_available`` is false. ``unpack_linears`` undoes it."""
    if not packing_available(model):
        return []

    def packed(layer: nn.Linear) -> PackedLinear:
        p = layer.__dict__.get("forward")  # packed already (an earlier engine on this model)
        return p if isinstance(p, PackedLinear) else PackedLinear(layer, forwards, max_tokens)

    return _wrap_linears(model, packed)


def unpack_linears(model: nn.Module) -> None:
    """Undo ``pack_linears`` or ``engine_linears``: every layer as built."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), PackedLinear | PaddedLinear):
            del module.forward

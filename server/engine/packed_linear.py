"""The engine's small-batch linears on weights prepacked for oneDNN (CPU, float32).

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
version moved)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from server.engine.shapes import bucket, row_buckets
from server.engine.steps import DecodeForward, MixedForward, PrefillForward
from vera_core.forward import ForwardSlot

ENGINE_FORWARDS = (DecodeForward, PrefillForward, MixedForward)
MAX_TOKENS = 128  # rows of a forward up to which the packed weight is faster (see above)


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
            or torch.is_grad_enabled()
            or not isinstance(self.forwards.current, ENGINE_FORWARDS)
            or x.dtype != torch.float32
        ):
            return self.original(x)
        if self.linear.weight._version != self.version:
            self.repack()
        rows = bucket(tokens, self.buckets)
        flat = x.reshape(tokens, x.shape[-1])
        if rows > tokens:  # zero rows up to the bucket: one cached primitive per bucket
            flat = torch.nn.functional.pad(flat, (0, 0, 0, rows - tokens))
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.linear.bias, "none", [], "")
        return y[:tokens].view(*x.shape[:-1], y.shape[-1])  # [..., out]

    def nbytes(self) -> int:
        p = self.packed
        return 0 if p is None else p.numel() * p.element_size()  # an opaque oneDNN tensor

    def remove(self) -> None:
        if self.linear.__dict__.get("forward") is self:
            del self.linear.forward  # the class's forward again


def pack_linears(
    model: nn.Module, forwards: ForwardSlot, max_tokens: int = MAX_TOKENS
) -> list[PackedLinear]:
    """Give every ``nn.Linear`` of ``model`` a packed weight its engine forwards use; [] when
    ``packing_available`` is false. ``remove()`` on each undoes it."""
    if not packing_available(model):
        return []
    packed = []
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        p = module.__dict__.get("forward")  # packed already (an earlier engine on this model)
        if not isinstance(p, PackedLinear):
            p = PackedLinear(module, forwards, max_tokens)
            module.forward = p  # type: ignore[method-assign, assignment]
        packed.append(p)
    return packed


def unpack_linears(model: nn.Module) -> None:
    """Undo ``pack_linears`` (an engine that compiles its decode step traces plain layers)."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), PackedLinear):
            del module.forward

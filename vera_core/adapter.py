"""One user's adapter: the vectors d_l, b_l of every adapted layer, and what they were made for."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vera_core.errors import AdapterMismatchError, AdapterValueError
from vera_core.layout import Layout

MAX_ABS_VALUE = 1e4  # any |value| above this is corrupt, not trained
ALLOWED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AdapterHeader:
    r: int
    projection_prng_key: int
    target_modules: tuple[str, ...]
    base_fingerprint: str  # "" when unknown (e.g. imported from PEFT)
    dtype: str = "float32"


@dataclass(frozen=True)
class Adapter:
    header: AdapterHeader
    vectors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (d [r], b [out])

    @property
    def num_params(self) -> int:
        return sum(d.numel() + b.numel() for d, b in self.vectors.values())

    def flat(self, layout: Layout, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[num_params] in ``layout`` order (the bank row format)."""
        parts = []
        for spec in layout.layers:
            d, b = self.vectors[spec.name]
            parts += [d.reshape(-1), b.reshape(-1)]
        return torch.cat(parts).to(dtype)

    @classmethod
    def from_flat(cls, header: AdapterHeader, layout: Layout, flat: torch.Tensor) -> Adapter:
        vectors, pos = {}, 0
        for spec in layout.layers:
            d = flat[pos : pos + layout.r]
            b = flat[pos + layout.r : pos + layout.r + spec.out_features]
            vectors[spec.name] = (d.clone(), b.clone())
            pos += layout.r + spec.out_features
        return cls(header, vectors)

    @classmethod
    def initial(cls, header: AdapterHeader, layout: Layout, d_initial: float) -> Adapter:
        """A fresh adapter: d = d_initial, b = 0 (the identity)."""
        vectors = {
            s.name: (torch.full((layout.r,), d_initial), torch.zeros(s.out_features))
            for s in layout.layers
        }
        return cls(header, vectors)

    def check_values(self, max_abs: float = MAX_ABS_VALUE) -> None:
        for name, (d, b) in self.vectors.items():
            for label, t in (("vera_lambda_d", d), ("vera_lambda_b", b)):
                if t.dtype not in ALLOWED_DTYPES:
                    raise AdapterValueError(
                        f"{name}.{label} has dtype {t.dtype}; expected float32, float16 or bfloat16"
                    )
                if not torch.isfinite(t).all():
                    raise AdapterValueError(f"{name}.{label} contains NaN or Inf")
                peak = t.abs().max().item() if t.numel() else 0.0
                if peak > max_abs:
                    raise AdapterValueError(
                        f"{name}.{label} has |value| {peak:.3g} > {max_abs:g}: "
                        "not a trained adapter"
                    )

    def check_fits(self, layout: Layout, key: int, fingerprint: str | None = None) -> None:
        """Raise AdapterMismatchError saying what differs from this server's layout, key, model."""
        if self.header.r != layout.r:
            raise AdapterMismatchError(
                f"adapter has r={self.header.r}, this server uses r={layout.r}"
            )
        if self.header.projection_prng_key != key:
            raise AdapterMismatchError(
                f"adapter has projection_prng_key={self.header.projection_prng_key}, "
                f"this server uses {key}"
            )
        expected = {s.name for s in layout.layers}
        got = set(self.vectors)
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise AdapterMismatchError(
                f"adapted layers differ from this server's targets: missing {missing[:4]}"
                f"{'...' if len(missing) > 4 else ''} ({len(missing)}), unexpected {extra[:4]}"
                f"{'...' if len(extra) > 4 else ''} ({len(extra)})"
            )
        for spec in layout.layers:
            d, b = self.vectors[spec.name]
            if tuple(d.shape) != (layout.r,):
                raise AdapterMismatchError(
                    f"{spec.name}.vera_lambda_d has shape {tuple(d.shape)}, expected ({layout.r},)"
                )
            if tuple(b.shape) != (spec.out_features,):
                raise AdapterMismatchError(
                    f"{spec.name}.vera_lambda_b has shape {tuple(b.shape)}, "
                    f"expected ({spec.out_features},)"
                )
        fp = self.header.base_fingerprint
        if fingerprint and fp and fp != fingerprint:
            raise AdapterMismatchError(
                f"adapter was trained on base model {fp}, this server runs {fingerprint}"
            )

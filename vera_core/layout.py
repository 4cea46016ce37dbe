"""The ordered list of adapted layers and where each one's d, b sit in a flat adapter row."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerSpec:
    name: str  # module path in the HF model, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class Layout:
    """Flat row = [d_0 (r), b_0 (out_0), d_1 (r), b_1 (out_1), ...] in ``layers`` order."""

    r: int
    layers: tuple[LayerSpec, ...]

    @property
    def num_params(self) -> int:
        return sum(self.r + spec.out_features for spec in self.layers)

    @property
    def max_in(self) -> int:
        return max(spec.in_features for spec in self.layers)

    @property
    def max_out(self) -> int:
        return max(spec.out_features for spec in self.layers)

    def offsets(self) -> dict[str, int]:
        out, pos = {}, 0
        for spec in self.layers:
            out[spec.name] = pos
            pos += self.r + spec.out_features
        return out

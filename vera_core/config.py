"""The frozen VeRA configuration shared by every adapter a server accepts."""

from __future__ import annotations

from dataclasses import dataclass, field

# PEFT's defaults per model type (peft.utils.constants, VeRA mapping).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
}

ALL_LINEAR = "all-linear"
REGEX_CHARS = frozenset("*+?[](){}|^$\\")  # PEFT reads one such string as a regex


def parse_targets(text: str) -> tuple[str, ...]:
    """A ``--target-modules`` value: comma-separated module names (spaces allowed),
    ``all-linear``, or one regex (full match, PEFT's reading of a single pattern string, which
    may itself hold commas); empty means the model type's default."""
    text = text.strip()
    if REGEX_CHARS & set(text):
        return (text,)
    return tuple(t.strip() for t in text.split(",") if t.strip())


@dataclass(frozen=True)
class VeraConfig:
    """VeRA hyper-parameters (arXiv 2310.11454).

    ``target_modules``: module-name suffixes (PEFT semantics: ``name == t`` or
    ``name.endswith("." + t)``), or the single string ``"all-linear"``; empty means the
    PEFT default for the model type.
    """

    r: int = 256
    projection_prng_key: int = 0
    target_modules: tuple[str, ...] = field(default=())
    d_initial: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        else:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.projection_prng_key, int) or self.projection_prng_key < 0:
            raise ValueError(f"projection_prng_key must be >= 0, got {self.projection_prng_key!r}")

    def resolved_targets(self, model_type: str) -> tuple[str, ...]:
        if self.target_modules:
            return self.target_modules
        if model_type not in DEFAULT_TARGETS:
            known = ", ".join(sorted(DEFAULT_TARGETS))
            raise ValueError(
                f"no default VeRA targets for model type {model_type!r} (known: {known}); "
                "pass target_modules explicitly"
            )
        return DEFAULT_TARGETS[model_type]

"""VeRA math: shared projections, batched many-user layers, adapter files, training."""

from vera_core.adapter import Adapter, AdapterHeader
from vera_core.bank import NO_ADAPTER, VeraBank
from vera_core.config import VeraConfig
from vera_core.errors import (
    AdapterFormatError,
    AdapterMismatchError,
    AdapterValueError,
    TargetModuleError,
    VeraError,
)
from vera_core.fingerprint import model_fingerprint
from vera_core.inject import VeraModel, inject_vera
from vera_core.layout import LayerSpec, Layout
from vera_core.projections import Projections

__all__ = [
    "NO_ADAPTER",
    "Adapter",
    "AdapterFormatError",
    "AdapterHeader",
    "AdapterMismatchError",
    "AdapterValueError",
    "LayerSpec",
    "Layout",
    "Projections",
    "TargetModuleError",
    "VeraBank",
    "VeraConfig",
    "VeraError",
    "VeraModel",
    "inject_vera",
    "model_fingerprint",
]

"""What the index records about one stored adapter version."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class AdapterMeta:
    """One stored version of one user's adapter.

    ``bytes`` and ``sha256`` describe the adapter file exactly as stored (vera_core's
    safetensors format); ``num_params`` is ``sum_l (r + out_l)``; ``created_at`` is unix time;
    ``base_fingerprint`` is the server model's fingerprint the adapter was accepted against.
    """

    user_id: str
    version: int
    bytes: int
    num_params: int
    sha256: str
    created_at: float
    base_fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

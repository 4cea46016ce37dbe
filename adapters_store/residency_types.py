"""Small value types of the residency tiers: tickets, host copies, a latency window."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import torch

Key = tuple[str, int]  # (user_id, version): what a slot or a host copy holds


@dataclass(eq=False)
class HostEntry:
    """One adapter version in host memory, or on its way there (``done`` not yet set)."""

    flat: torch.Tensor | None = None  # [num_params] float32, pinned on CUDA hosts
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def nbytes(self) -> int:
        return 0 if self.flat is None else self.flat.numel() * self.flat.element_size()


@dataclass(eq=False)
class SlotTicket:
    """One request's claim on ``(user_id, version)``; pass it to ``SlotPool.acquire``.

    The version is fixed when the ticket is made: a later re-upload does not change what
    this request runs with. ``slot`` is set by a successful ``acquire``.
    """

    user_id: str
    version: int
    created: float  # time.monotonic() of the request, for the acquire timeout
    slot: int | None = None
    _entry: HostEntry | None = None
    _on_device: bool = False

    @property
    def key(self) -> Key:
        return (self.user_id, self.version)

    @property
    def ready(self) -> bool:
        """The adapter was in a device slot at request time, or its host copy is present."""
        return self._on_device or (self._entry is not None and self._entry.flat is not None)

    @property
    def error(self) -> BaseException | None:
        """Why loading failed (e.g. AdapterNotFound, StoreCorruptError), else None."""
        return None if self._entry is None else self._entry.error

    def wait_host(self, timeout: float | None = None) -> bool:
        """Block until the host copy is loaded (True), failed or timed out (False)."""
        if self._entry is None:
            return self._on_device
        self._entry.done.wait(timeout)
        return self._entry.flat is not None


class LatencyWindow:
    """The last ``size`` samples (ms), for p50/p99; not thread-safe (caller locks)."""

    def __init__(self, size: int = 4096) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self.count = 0

    def add(self, ms: float) -> None:
        self._samples.append(ms)
        self.count += 1

    def percentiles(self) -> dict[str, float | int]:
        if not self._samples:
            return {"p50": 0.0, "p99": 0.0, "count": 0}
        ordered = sorted(self._samples)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
        return {"p50": round(pick(0.5), 3), "p99": round(pick(0.99), 3), "count": self.count}

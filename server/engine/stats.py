"""Engine counters and latency percentiles (bounded memory)."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from server.engine.sequence import Sequence


class Window:
    """The last ``size`` samples and their percentiles; thread-safe. ``scale`` converts a
    sample to the reported unit (1000: seconds recorded, milliseconds reported)."""

    def __init__(self, size: int = 2048, scale: float = 1.0) -> None:
        self._d: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.scale = scale
        self.count = 0  # samples ever added

    def add(self, value: float) -> None:
        with self._lock:
            self._d.append(value)
            self.count += 1

    def percentiles(self, qs: tuple[float, ...] = (50, 90, 99)) -> dict[str, float | int | None]:
        """``{"p50": ..., "p90": ..., "p99": ..., "count": n}`` (None while empty)."""
        with self._lock:
            data, count = sorted(self._d), self.count
        out: dict[str, float | int | None] = {
            f"p{int(q)}": (
                round(data[min(len(data) - 1, int(q / 100 * len(data)))] * self.scale, 3)
                if data
                else None
            )
            for q in qs
        }
        out["count"] = count
        return out


class FinishObserver(Protocol):
    """Told of every finished sequence on the engine thread (e.g. Prometheus histograms)."""

    def finished(self, seq: Sequence, reason: str) -> None: ...


class EngineStats:
    def __init__(self) -> None:
        self.started = time.time()
        self.submitted = 0
        self.completion_tokens = 0
        self.finish_reasons: Counter[str] = Counter()
        self.preemptions = 0  # rows taken back for a client below its share
        self.ttft = Window(scale=1e3)  # seconds recorded, ms reported
        self.latency = Window(scale=1e3)
        self._recent: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, tokens)
        self.observers: list[FinishObserver] = []

    def tokens_out(self, n: int) -> None:
        self.completion_tokens += n
        self._recent.append((time.perf_counter(), n))

    def finished(self, seq: Sequence, reason: str) -> None:
        self.finish_reasons[reason] += 1
        if seq.finished_at is not None:
            self.latency.add(seq.finished_at - seq.arrival)
        for observer in self.observers:
            observer.finished(seq, reason)

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window_s]
        if not recent:
            return 0.0
        span = max(1e-3, now - recent[0][0])
        return round(sum(n for _, n in recent) / span, 2)

"""Engine counters and latency percentiles (bounded memory)."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any


class Window:
    """The last ``size`` samples, for percentiles."""

    def __init__(self, size: int = 2048) -> None:
        self._d: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self._d.append(value)

    def percentiles(self, qs: tuple[float, ...] = (50, 90, 99)) -> dict[str, float | None]:
        with self._lock:
            data = sorted(self._d)
        if not data:
            return {f"p{int(q)}": None for q in qs}
        return {
            f"p{int(q)}": round(data[min(len(data) - 1, int(q / 100 * len(data)))] * 1e3, 2)
            for q in qs
        }


class EngineStats:
    def __init__(self) -> None:
        self.started = time.time()
        self.submitted = 0
        self.completion_tokens = 0
        self.finish_reasons: Counter[str] = Counter()
        self.ttft = Window()
        self.latency = Window()
        self._recent: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, tokens)
        self.listeners: list[Any] = []  # callables(seq, reason), e.g. Prometheus histograms
        self.background_units = 0  # work run between steps (fine-tuning forward/backward)
        self.background_seconds = 0.0

    def background(self, seconds: float) -> None:
        self.background_units += 1
        self.background_seconds += seconds

    def tokens_out(self, n: int) -> None:
        self.completion_tokens += n
        self._recent.append((time.perf_counter(), n))

    def finished(self, seq: Any, reason: str) -> None:
        self.finish_reasons[reason] += 1
        if seq.finished_at is not None:
            self.latency.add(seq.finished_at - seq.arrival)
        for listener in self.listeners:
            listener(seq, reason)

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window_s]
        if not recent:
            return 0.0
        span = max(1e-3, now - recent[0][0])
        return round(sum(n for _, n in recent) / span, 2)

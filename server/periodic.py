"""A call repeated on a daemon thread of its own while started (stats sampling, heap release)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Periodic:
    """``tick()`` every ``interval_s`` seconds on a daemon thread named ``name``, between
    ``start()`` and ``stop()``; once at the start too when ``at_start``. ``stop`` waits for a
    tick in progress."""

    def __init__(
        self, name: str, interval_s: float, tick: Callable[[], object], at_start: bool = False
    ) -> None:
        self.name, self.interval_s, self.tick, self.at_start = name, interval_s, tick, at_start
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()

    def _run(self) -> None:
        if self.at_start:
            self.tick()
        while not self._stop.wait(self.interval_s):
            self.tick()

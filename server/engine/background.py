"""Work other than serving that runs on the engine thread between steps (fine-tuning units).

Units never overlap a serving forward (one thread runs both). While no request is in flight
they run back to back; while any is, each unit is followed by a pause so that units take at
most ``share`` of the time: after a unit of ``t`` seconds, serving has the thread for
``t * (1 - share) / share`` before the next unit may start.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from server.engine.errors import EngineStopped

T = TypeVar("T")


class BackgroundWork:
    """A queue of units and the rule that spaces them. ``submit`` from any thread; the rest
    from the engine thread."""

    def __init__(self, share: float) -> None:
        if not 0 < share <= 1:
            raise ValueError("background share must be in (0, 1]")
        self.share = share
        self.units = 0  # units run so far
        self.seconds = 0.0  # and their time
        self._queue: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._lock = threading.Lock()
        self._not_before = 0.0  # perf_counter time before which no unit starts while serving

    def __bool__(self) -> bool:
        return bool(self._queue)

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            self._queue.append((fn, future))
        return future

    def due(self, serving: bool) -> bool:
        """A unit is queued and may run now."""
        return bool(self._queue) and (not serving or time.perf_counter() >= self._not_before)

    def seconds_until_due(self, serving: bool) -> float | None:
        """How long the engine may sleep before a queued unit is due; None if none is queued."""
        if not self._queue:
            return None
        return 0.0 if not serving else max(0.0, self._not_before - time.perf_counter())

    def run_one(self, serving: bool) -> None:
        """Run the oldest unit; its result or exception goes to its future."""
        with self._lock:
            fn, future = self._queue.popleft()
        if not future.set_running_or_notify_cancel():
            return
        t0 = time.perf_counter()
        try:
            future.set_result(fn())
        except BaseException as e:  # the caller decides; the engine goes on serving
            future.set_exception(e)
        took = time.perf_counter() - t0
        self.units += 1
        self.seconds += took
        pause = took * (1 - self.share) / self.share if serving else 0.0
        self._not_before = time.perf_counter() + pause

    def drop_all(self) -> None:
        """The engine is stopping: every queued unit fails with ``EngineStopped``."""
        with self._lock:
            queued = list(self._queue)
            self._queue.clear()
        for _, future in queued:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineStopped("the server is shutting down"))

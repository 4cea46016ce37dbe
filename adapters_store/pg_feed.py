"""A change feed: ``NOTIFY <channel>, '<payload>'`` from writers, one listener per process.

Writers notify inside their transaction (``PostgresDatabase.notify``); PostgreSQL delivers it
at COMMIT (never for a rolled-back write) to every connection that ran ``LISTEN <channel>``,
including the writer's own process. ``ChangeFeed`` owns one daemon thread with its own
connection that calls every subscribed ``callback(payload)`` per notification. When the
connection breaks it reconnects by itself (backoff ``_BACKOFF_S`` up to ``_MAX_BACKOFF_S``) and
then calls ``callback(None)``: notifications sent while it was away are lost, so the subscriber
must revalidate everything it holds. Callbacks run on the listener thread one at a time; one that
raises is logged and the feed goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg

from adapters_store.errors import StoreUnavailable
from adapters_store.pg_pool import CONNECT_TIMEOUT_S, connect

log = logging.getLogger(__name__)

_POLL_S = 0.5  # how often the listener looks at its stop flag
_BACKOFF_S, _MAX_BACKOFF_S = 0.1, 2.0
Callback = Callable[[str | None], None]


class ChangeFeed:
    """One LISTEN connection and thread per channel, started by the first ``add``."""

    def __init__(self, dsn: str, channel: str) -> None:
        if not channel.isidentifier():
            raise ValueError(f"channel {channel!r} is not an SQL identifier")
        self._dsn, self._channel = dsn, channel
        self._callbacks: list[Callback] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._subscribed = False  # set when the first add() returned: later connects say None
        self._thread: threading.Thread | None = None

    def add(self, callback: Callback) -> None:
        """Subscribe ``callback``. Waits up to a connect timeout for the first LISTEN, so that
        changes committed after ``add`` returns are heard or followed by ``callback(None)``."""
        with self._lock:
            self._callbacks.append(callback)
            if self._thread is None:
                name = f"vera-feed-{self._channel}"
                self._thread = threading.Thread(target=self._run, name=name, daemon=True)
                self._thread.start()
        self._listening.wait(CONNECT_TIMEOUT_S + 1)
        with self._lock:
            self._subscribed = True

    def close(self) -> None:
        """Stop the listener thread (within about ``_POLL_S``) and close its connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=CONNECT_TIMEOUT_S + 2 * _POLL_S)

    def _run(self) -> None:
        delay, connected = _BACKOFF_S, False
        while not self._stop.is_set():
            try:
                with connect(self._dsn) as conn:
                    conn.execute(f"LISTEN {self._channel}")
                    with self._lock:
                        missed = self._subscribed  # changes may have passed while away
                    self._listening.set()
                    delay, connected = _BACKOFF_S, True
                    if missed:
                        log.info("change feed %s reconnected: revalidating", self._channel)
                        self._deliver(None)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=_POLL_S):
                            self._deliver(note.payload)
            except (psycopg.Error, StoreUnavailable) as e:
                level = logging.WARNING if connected else logging.DEBUG  # once per outage
                log.log(
                    level, "change feed %s lost its connection (%s); reconnecting", self._channel, e
                )
                connected = False
            with self._lock:
                self._subscribed = self._subscribed or self._listening.is_set()
            self._stop.wait(delay)
            delay = min(2 * delay, _MAX_BACKOFF_S)

    def _deliver(self, payload: str | None) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(payload)
            except Exception:
                log.exception("change feed %s: a callback failed for %r", self._channel, payload)

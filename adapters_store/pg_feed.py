"""The change feed: ``NOTIFY vera_adapters, '<user_id>'`` from writers, one listener per process.

Writers call ``notify`` inside their transaction; PostgreSQL delivers it at COMMIT (never for a
rolled-back write) to every connection that ran ``LISTEN vera_adapters``, including the
writer's own process. ``ChangeFeed`` owns one daemon thread with its own connection that calls
every subscribed ``callback(user_id)`` per notification. When the connection breaks it
reconnects by itself (backoff ``_BACKOFF_S`` up to ``_MAX_BACKOFF_S``) and then calls
``callback(None)``: notifications sent while it was away are lost, so the subscriber must
revalidate everything it holds. Callbacks run on the listener thread one at a time; one that
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

CHANNEL = "vera_adapters"
_POLL_S = 0.5  # how often the listener looks at its stop flag
_BACKOFF_S, _MAX_BACKOFF_S = 0.1, 2.0
Callback = Callable[[str | None], None]


def notify(conn: psycopg.Connection, user_id: str) -> None:
    """Announce a change of ``user_id`` when the caller's transaction commits."""
    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, user_id))


class ChangeFeed:
    """One LISTEN connection and thread per backend, started by the first ``add``."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
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
                self._thread = threading.Thread(target=self._run, name="vera-feed", daemon=True)
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
                    conn.execute(f"LISTEN {CHANNEL}")
                    with self._lock:
                        missed = self._subscribed  # changes may have passed while away
                    self._listening.set()
                    delay, connected = _BACKOFF_S, True
                    if missed:
                        log.info("adapter change feed reconnected: revalidating")
                        self._deliver(None)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=_POLL_S):
                            self._deliver(note.payload)
            except (psycopg.Error, StoreUnavailable) as e:
                level = logging.WARNING if connected else logging.DEBUG  # once per outage
                log.log(level, "adapter change feed lost its connection (%s); reconnecting", e)
                connected = False
            with self._lock:
                self._subscribed = self._subscribed or self._listening.is_set()
            self._stop.wait(delay)
            delay = min(2 * delay, _MAX_BACKOFF_S)

    def _deliver(self, user_id: str | None) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(user_id)
            except Exception:
                log.exception("adapter change feed callback failed for %r", user_id)

"""Known user keys held in memory, so most requests authenticate without a store call."""

from __future__ import annotations

import threading
import time
from typing import Protocol

from adapters_store import StoreUnavailable
from server.auth.keys import key_digest

KEY_CACHE_TTL_S = 10.0  # a rotated key stops working on every replica within this


class KeyLookup(Protocol):
    """What the cache asks: the user a key belongs to (``KeyRegistry`` answers it)."""

    def authenticate(self, key: str) -> str | None: ...


class KeyCache:
    """Known user keys (by SHA-256 digest), so most requests authenticate without a store call.

    An entry is trusted for ``ttl_s`` after the registry last confirmed it; while the registry
    is unreachable (``StoreUnavailable``) entries of any age are trusted, so users this server
    already knows keep being served through a database outage. Unknown keys always ask the
    registry (never cached as invalid).
    """

    def __init__(self, registry: KeyLookup, ttl_s: float = KEY_CACHE_TTL_S) -> None:
        self.registry, self.ttl_s = registry, ttl_s
        self._known: dict[str, tuple[str, float]] = {}  # digest -> (user_id, confirmed at)
        self._lock = threading.Lock()

    def fresh(self, key: str) -> str | None:
        """The user of a recently confirmed key, without I/O; None means: ask ``lookup``."""
        with self._lock:
            hit = self._known.get(key_digest(key))
        if hit is not None and time.monotonic() - hit[1] < self.ttl_s:
            return hit[0]
        return None

    def lookup(self, key: str) -> str | None:
        """Ask the registry (blocking I/O: call from a worker thread)."""
        digest = key_digest(key)
        try:
            user_id = self.registry.authenticate(key)
        except StoreUnavailable:
            with self._lock:
                hit = self._known.get(digest)
            if hit is None:
                raise
            return hit[0]
        with self._lock:
            if user_id is None:
                self._known.pop(digest, None)
            else:
                self._known[digest] = (user_id, time.monotonic())
        return user_id

"""The one owner of an adapter's lifecycle: validate -> store -> make visible.

Every writer (the native upload route, the OpenAI routes, training jobs) goes through
``AdapterService``; no route touches the store and the slot pool on its own. Visibility: once
``publish`` or ``delete`` returns, the store's index names the new state, and every process
sharing the store resolves a request's version from that index at admission
(``SlotPool.request``), so the acknowledgement is read-your-writes everywhere. Invalidating the
local pool and listening to the store's change feed only free stale copies early.
"""

from __future__ import annotations

import logging

from adapters_store import AdapterMeta, AdapterNotFound, AdapterStore
from server.engine.adapter_slots import SlotPool
from vera_core.adapter import Adapter

log = logging.getLogger(__name__)


class AdapterService:
    """Publish, delete and describe users' adapters on one store + slot pool. Thread-safe."""

    def __init__(self, store: AdapterStore, pool: SlotPool) -> None:
        self.store, self.pool = store, pool
        store.backend.subscribe(self._on_change)

    def publish(self, user_id: str, adapter: Adapter) -> AdapterMeta:
        """Validate ``adapter`` against this server (values, r, key, layers, base model), store
        it durably as the user's next version, then drop older local copies.

        Raises AdapterValueError / AdapterMismatchError before anything is written, and
        StoreUnavailable (nothing acknowledged) when the store cannot be reached.
        """
        meta = self.store.put(user_id, adapter)
        self.pool.invalidate(user_id)
        log.info("adapter %s v%d published (%d bytes)", user_id, meta.version, meta.bytes)
        return meta

    def delete(self, user_id: str) -> None:
        """Retire the user's adapter everywhere; AdapterNotFound if there is none."""
        if not self.store.delete(user_id):
            raise AdapterNotFound(f"user {user_id!r} has no adapter")
        self.pool.invalidate(user_id)
        log.info("adapter %s deleted", user_id)

    def describe(self, user_id: str) -> AdapterMeta:
        """The current version's metadata; AdapterNotFound if the user has none."""
        return self.store.meta(user_id)

    def _on_change(self, user_id: str | None) -> None:
        """Change feed (another process wrote, or the feed reconnected: ``None``)."""
        try:
            if user_id is None:
                self.pool.revalidate()
            else:
                self.pool.invalidate(user_id)
        except Exception:  # the feed thread must survive a bad moment of the store
            log.exception("adapter change feed: invalidating %s failed", user_id or "all")

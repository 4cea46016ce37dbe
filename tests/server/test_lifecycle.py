"""The adapter lifecycle owner and the key cache, without HTTP or a model."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "adapters_store"))

from helpers import FP, KEY, LAYOUT, filled_adapter  # noqa: E402
from slots_kit import wait_host  # noqa: E402

from adapters_store import (  # noqa: E402
    AdapterNotFound,
    AdapterStore,
    LocalBackend,
    StoreUnavailable,
)
from server.adapter_service import AdapterService  # noqa: E402
from server.auth import KeyCache, key_digest  # noqa: E402
from server.engine import SlotPool  # noqa: E402
from vera_core import AdapterMismatchError, VeraBank  # noqa: E402


class FeedBackend(LocalBackend):
    """A local backend whose change feed the test drives by hand."""

    listener: Callable[[str | None], None] | None = None

    def subscribe(self, callback: Callable[[str | None], None]) -> None:
        self.listener = callback


@pytest.fixture
def service(tmp_path: Path):
    backend = FeedBackend(tmp_path / "store")
    store = AdapterStore(backend, LAYOUT, KEY, FP)
    pool = SlotPool(VeraBank(LAYOUT, 3), store, host_capacity=4)
    yield AdapterService(store, pool)
    pool.close()
    store.close()


def resident_versions(pool: SlotPool, user: str) -> list[int]:
    return sorted(v for u, v in pool._by_key if u == user)


def serve_once(pool: SlotPool, user: str) -> float:
    ticket = pool.request(user)
    assert wait_host(ticket, 5.0), ticket.error
    slot = pool.acquire(ticket)
    assert slot is not None
    pool.release(slot)
    return pool.bank.rows[slot][0].item()


def test_publish_validates_stores_and_drops_stale_copies(service: AdapterService) -> None:
    pool = service.pool
    assert service.publish("ann", filled_adapter(1.0)).version == 1
    assert serve_once(pool, "ann") == 1.0 and resident_versions(pool, "ann") == [1]
    assert service.publish("ann", filled_adapter(2.0)).version == 2
    assert resident_versions(pool, "ann") == []  # v1 freed at once, not left to LRU
    assert serve_once(pool, "ann") == 2.0
    assert service.describe("ann").version == 2


def test_publish_refuses_before_writing(service: AdapterService) -> None:
    from dataclasses import replace

    bad = filled_adapter(1.0)
    bad = type(bad)(replace(bad.header, r=LAYOUT.r * 2), bad.vectors)
    with pytest.raises(AdapterMismatchError, match="r="):
        service.publish("bob", bad)
    with pytest.raises(AdapterNotFound):
        service.describe("bob")


def test_delete_and_change_feed_free_slots(service: AdapterService) -> None:
    pool, backend = service.pool, service.store.backend
    service.publish("cy", filled_adapter(1.0))
    service.publish("di", filled_adapter(4.0))
    serve_once(pool, "cy"), serve_once(pool, "di")
    service.delete("cy")
    assert resident_versions(pool, "cy") == []
    with pytest.raises(AdapterNotFound):
        service.delete("cy")
    service.store.put("di", filled_adapter(5.0))  # another replica's write: only the feed knows
    assert resident_versions(pool, "di") == [1]
    backend.listener("di")
    assert resident_versions(pool, "di") == []
    assert serve_once(pool, "di") == 5.0
    service.store.delete("di")
    backend.listener(None)  # a reconnect: everything held is checked again
    assert resident_versions(pool, "di") == []
    assert torch.count_nonzero(pool.bank.rows[0]) == 0


class CountingRegistry:
    """Keys in a dict; counts lookups; can be made unreachable."""

    def __init__(self) -> None:
        self.keys = {"vk-good": "eve"}
        self.calls = 0
        self.down = False

    def authenticate(self, key: str) -> str | None:
        self.calls += 1
        if self.down:
            raise StoreUnavailable("the user database is unreachable (test)")
        for known, user in self.keys.items():
            if key_digest(known) == key_digest(key):
                return user
        return None


def test_key_cache_trusts_recent_answers_and_survives_an_outage() -> None:
    registry = CountingRegistry()
    cache = KeyCache(registry, ttl_s=60.0)
    assert cache.fresh("vk-good") is None  # never confirmed yet: ask the registry
    assert cache.lookup("vk-good") == "eve" and registry.calls == 1
    assert cache.fresh("vk-good") == "eve" and registry.calls == 1
    assert cache.lookup("vk-bad") is None and cache.fresh("vk-bad") is None
    registry.down = True
    assert cache.lookup("vk-good") == "eve"  # known key: served through the outage
    with pytest.raises(StoreUnavailable):
        cache.lookup("vk-unknown")
    registry.down = False
    short = KeyCache(registry, ttl_s=0.0)
    assert short.lookup("vk-good") == "eve" and short.fresh("vk-good") is None  # expired at once
    del registry.keys["vk-good"]  # rotated on another replica
    assert short.lookup("vk-good") is None
    registry.down = True
    with pytest.raises(StoreUnavailable):  # the registry said no: not trusted in an outage
        short.lookup("vk-good")

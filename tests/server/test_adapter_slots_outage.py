"""The slot pool while the store is unreachable, and how it follows the store's change feed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from slots_kit import FP, KEY, LAYOUT, filled_adapter, wait_host

from adapters_store import AdapterMeta, AdapterStore, StoreUnavailable
from server.engine import SlotPool, adapter_slots
from vera_core import VeraBank


class SwitchableStore(AdapterStore):
    """A store whose index can be made unreachable, like a database that went away."""

    down = False
    lookups = 0

    def meta(self, user_id: str) -> AdapterMeta:
        self.lookups += 1
        if self.down:
            raise StoreUnavailable("the adapter database is unreachable (test)")
        return super().meta(user_id)

    def totals(self) -> tuple[int, int]:
        if self.down:
            raise StoreUnavailable("the adapter database is unreachable (test)")
        return super().totals()


@pytest.fixture
def setup(tmp_path: Path):
    store = SwitchableStore(tmp_path / "store", LAYOUT, KEY, FP)
    pool = SlotPool(VeraBank(LAYOUT, 3), store, host_capacity=4)
    yield store, store, pool
    pool.close()
    store.close()


def value_served(pool: SlotPool, user: str) -> tuple[int, float]:
    """(version, value in its slot) for one request, as the engine would run it."""
    ticket = pool.request(user)
    assert wait_host(ticket, 5.0), ticket.error
    slot = pool.acquire(ticket)
    assert slot is not None
    value = pool.bank.rows[slot][0].item()
    pool.release(slot)
    return ticket.version, value


def test_outage_serves_the_newest_held_version_and_refuses_unknown_users(
    setup, monkeypatch
) -> None:
    monkeypatch.setattr(adapter_slots, "OUTAGE_RECHECK_S", 0.0)  # ask the store every time
    backend, store, pool = setup
    store.put("held", filled_adapter(1.0))
    store.put("held", filled_adapter(2.0))
    store.put("never-seen", filled_adapter(9.0))
    assert value_served(pool, "held") == (2, 2.0)
    backend.down = True
    assert value_served(pool, "held") == (2, 2.0)
    assert pool.stats()["unverified"] == 1
    with pytest.raises(StoreUnavailable, match="holds no copy of 'never-seen'"):
        pool.request("never-seen")
    stats = pool.stats()  # still answers: what this process holds is worth reporting
    assert stats["disk"]["reachable"] is False and stats["device"]["adapters"] == 1
    pool.invalidate("held")  # cannot compare while down: keeps what it has
    assert value_served(pool, "held") == (2, 2.0)
    backend.down = False
    assert value_served(pool, "never-seen") == (1, 9.0)


def test_revalidate_drops_versions_the_store_no_longer_serves(setup) -> None:
    """What the change feed triggers after a reconnect: every held user is checked again."""
    _, store, pool = setup
    store.put("a", filled_adapter(1.0))
    store.put("b", filled_adapter(5.0))
    assert value_served(pool, "a") == (1, 1.0) and value_served(pool, "b") == (1, 5.0)
    store.put("a", filled_adapter(3.0))  # written by "another process": no local invalidate
    store.delete("b")
    pool.revalidate()
    keys = set(pool._by_key)
    assert keys == set(), keys  # a's v1 and b's v1 were idle: both freed at once
    assert value_served(pool, "a") == (2, 3.0)
    assert torch.count_nonzero(pool.bank.rows[0]) == 0  # the base-model row is never written


def test_after_a_failed_lookup_the_store_is_left_alone_for_a_moment(setup, monkeypatch) -> None:
    """Each request would otherwise wait out the connection timeout during an outage."""
    monkeypatch.setattr(adapter_slots, "OUTAGE_RECHECK_S", 0.3)
    backend, store, pool = setup
    store.put("held", filled_adapter(1.0))
    assert value_served(pool, "held") == (1, 1.0)
    backend.down, before = True, backend.lookups
    for _ in range(5):
        assert value_served(pool, "held") == (1, 1.0)
    assert backend.lookups == before + 1
    backend.down = False
    store.put("held", filled_adapter(2.0))  # acknowledged elsewhere as the store comes back
    time.sleep(0.35)
    assert value_served(pool, "held") == (2, 2.0)  # read-your-writes again after the recheck

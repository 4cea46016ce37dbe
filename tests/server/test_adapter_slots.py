from __future__ import annotations

import time

import pytest
import torch
from slots_kit import FP, KEY, LAYOUT, filled_adapter, wait_host

from adapters_store import AdapterNotFound, AdapterStore, StoreCorruptError
from server.engine import AdapterLoadTimeout, SlotPool, SlotsExhausted, SlotTicket
from vera_core import VeraBank


@pytest.fixture
def store(tmp_path) -> AdapterStore:
    """A local store (the pool sees only AdapterStore; one test damages a file on disk)."""
    with AdapterStore(tmp_path / "store", LAYOUT, KEY, FP) as store:
        yield store


@pytest.fixture
def make_pool(store: AdapterStore):
    pools: list[SlotPool] = []

    def _make(slots: int = 2, host: int = 8, timeout: float = 5.0) -> SlotPool:
        for i in range(10):
            store.put(f"u{i}", filled_adapter(float(i + 1)))
        pool = SlotPool(VeraBank(LAYOUT, slots + 1), store, host, acquire_timeout_s=timeout)
        pools.append(pool)
        return pool

    yield _make
    for pool in pools:
        pool.close()


def take(pool: SlotPool, user: str) -> int:
    """request + wait for the host copy + acquire, as the engine would over a few steps."""
    ticket = pool.request(user)
    assert wait_host(ticket, 5.0), ticket.error
    slot = pool.acquire(ticket)
    assert slot is not None and ticket.slot == slot
    return slot


def resident(pool: SlotPool) -> dict[str, int]:
    """user -> value held in each occupied slot (adapters are filled with one value)."""
    return {key[0]: int(pool.bank.rows[s][0].item()) for s, key in pool._slot_key.items()}


def test_acquire_copies_into_a_slot_and_shares_it(make_pool) -> None:
    pool = make_pool()
    slot = take(pool, "u0")
    assert slot != 0 and torch.equal(pool.bank.rows[slot], torch.ones(LAYOUT.num_params))
    assert torch.equal(pool.bank.rows[0], torch.zeros(LAYOUT.num_params))  # base model row
    assert take(pool, "u0") == slot
    s = pool.stats()
    assert (s["slots_used"], s["slots_pinned"], s["slots_free"], s["slots_total"]) == (1, 1, 1, 2)
    assert (s["misses"], s["hits"]) == (1, 1)
    assert s["bytes_per_adapter"] == LAYOUT.num_params * 4 and s["device"]["adapters"] == 1
    assert s["host"] == {"adapters": 1, "bytes": LAYOUT.num_params * 4, "capacity": 8}
    assert s["disk"]["adapters"] == 10 and s["disk"]["bytes"] == sum(
        m.bytes for m in pool.store.list()
    )
    assert s["load_latency_ms"]["count"] == 1 and s["load_latency_ms"]["p50"] > 0


def test_lru_evicts_least_recently_released(make_pool) -> None:
    pool = make_pool(slots=2)
    a, b = take(pool, "u0"), take(pool, "u1")
    pool.release(b)
    pool.release(a)  # idle order: b (older), a
    c = take(pool, "u2")
    assert c == b and set(resident(pool)) == {"u0", "u2"}
    pool.release(c)  # idle order: a, c
    assert take(pool, "u0") == a  # a hit; pins a again
    pool.release(a)  # idle order: c, a
    assert take(pool, "u3") == c and set(resident(pool)) == {"u0", "u3"}
    assert pool.stats()["evictions"] == 2


def test_pinned_slot_is_never_evicted_and_waiter_times_out(make_pool) -> None:
    pool = make_pool(slots=2, timeout=0.3)
    a = take(pool, "u0")
    b = take(pool, "u1")  # both pinned
    waiter = pool.request("u2")
    assert wait_host(waiter, 5.0)
    assert pool.acquire(waiter) is None  # waits, nothing evicted
    assert take(pool, "u0") == a  # others keep being served meanwhile
    assert resident(pool) == {"u0": 1, "u1": 2}
    time.sleep(0.35)
    with pytest.raises(SlotsExhausted, match="all 2 adapter slots"):
        pool.acquire(waiter)
    pool.release(b)
    late = pool.request("u2")
    assert pool.acquire(late) == b and resident(pool)["u2"] == 3


def test_waiter_gets_the_slot_once_one_is_released(make_pool) -> None:
    pool = make_pool(slots=1)
    a = take(pool, "u0")
    waiter = pool.request("u1")
    wait_host(waiter, 5.0)
    assert pool.acquire(waiter) is None
    pool.release(a)
    assert pool.acquire(waiter) == a and resident(pool) == {"u1": 2}


def test_replace_while_pinned_keeps_old_version_for_running_request(make_pool, store) -> None:
    pool = make_pool(slots=2)
    old_slot = take(pool, "u0")
    store.put("u0", filled_adapter(100.0))
    pool.invalidate("u0")
    assert pool.bank.rows[old_slot][0].item() == 1.0  # the running request's v1 is untouched
    ticket = pool.request("u0")
    assert ticket.version == 2
    wait_host(ticket, 5.0)
    new_slot = pool.acquire(ticket)
    assert new_slot not in (None, old_slot) and pool.bank.rows[new_slot][0].item() == 100.0
    pool.release(old_slot)  # last user of v1: the stale slot is freed, not kept for LRU
    assert pool.stats()["slots_used"] == 1 and list(resident(pool)) == ["u0"]
    assert take(pool, "u0") == new_slot


def test_invalidate_after_delete_frees_idle_slot_and_host_copy(make_pool, store) -> None:
    pool = make_pool(slots=2)
    pool.release(take(pool, "u0"))
    store.delete("u0")
    pool.invalidate("u0")
    s = pool.stats()
    assert (s["slots_used"], s["host"]["adapters"]) == (0, 0)
    with pytest.raises(AdapterNotFound):
        pool.request("u0")


def test_ticket_keeps_its_version_across_a_reupload(make_pool, store) -> None:
    pool = make_pool(slots=2)
    ticket = pool.request("u0")
    store.put("u0", filled_adapter(50.0))
    wait_host(ticket, 5.0)
    slot = pool.acquire(ticket)
    assert ticket.version == 1 and pool.bank.rows[slot][0].item() == 1.0


def test_host_cache_is_lru_bounded_and_tickets_survive_eviction(make_pool) -> None:
    pool = make_pool(slots=4, host=2)
    tickets = [pool.request(f"u{i}") for i in range(3)]
    for t in tickets:
        assert wait_host(t, 5.0)
    s = pool.stats()
    assert s["host"]["adapters"] == 2 and s["host_evictions"] == 1
    slots = [pool.acquire(t) for t in tickets]
    assert [pool.bank.rows[s][0].item() for s in slots] == [1.0, 2.0, 3.0]


def test_device_hit_after_eviction_reloads(make_pool) -> None:
    pool = make_pool(slots=2, host=1)
    pool.release(take(pool, "u0"))
    pool.release(take(pool, "u1"))  # host cache now holds only u1
    ticket = pool.request("u0")  # device hit, no host copy
    assert ticket.host is None
    pool.release(take(pool, "u2"))  # evicts u0 (least recently used) from its slot
    assert "u0" not in resident(pool)
    assert pool.acquire(ticket) is None  # reload started off the engine thread
    deadline = time.monotonic() + 5
    while (slot := pool.acquire(ticket)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert slot is not None and pool.bank.rows[slot][0].item() == 1.0


def test_load_error_is_delivered_to_the_ticket(make_pool, store) -> None:
    pool = make_pool()
    path = store.backend.root / "adapters" / "u5" / "v1.safetensors"
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    ticket = pool.request("u5")
    assert not wait_host(ticket, 5.0) and isinstance(ticket.error, StoreCorruptError)
    with pytest.raises(StoreCorruptError):
        pool.acquire(ticket)
    assert pool.stats()["host"]["adapters"] == 0


def test_slow_disk_gives_load_timeout(make_pool, store, monkeypatch) -> None:
    pool = make_pool(timeout=0.1)
    slow = store.load_flat
    monkeypatch.setattr(store, "load_flat", lambda *a: (time.sleep(0.5), slow(*a))[1])
    ticket = pool.request("u1")
    assert pool.acquire(ticket) is None
    time.sleep(0.15)
    with pytest.raises(AdapterLoadTimeout):
        pool.acquire(ticket)


def test_release_of_unacquired_slot_is_an_error(make_pool) -> None:
    pool = make_pool()
    with pytest.raises(ValueError, match="not acquired"):
        pool.release(1)
    assert isinstance(pool.request("u1"), SlotTicket)

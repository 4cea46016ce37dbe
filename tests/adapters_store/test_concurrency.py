"""Threads hammering put/get/delete/load_flat and the slot pool: no corruption, no deadlock."""

from __future__ import annotations

import queue
import random
import threading
import time

import torch
from helpers import LAYOUT, filled_adapter, read_adapter

from adapters_store import AdapterNotFound, AdapterStore
from server.engine import SlotPool
from vera_core import VeraBank

USERS = 12
OPS_PER_CLIENT = 600
CLIENTS = 5


def value_ok(user: str, value: float) -> bool:
    """Client writes for user u<i> always use values i + USERS * k."""
    return int(value) % USERS == int(user[1:])


def client(store: AdapterStore, pool: SlotPool, seed: int, jobs: queue.Queue, errors: list) -> None:
    rng = random.Random(seed)
    try:
        for _ in range(OPS_PER_CLIENT):
            i = rng.randrange(USERS)
            user, op = f"u{i}", rng.random()
            try:
                if op < 0.3:
                    store.put(user, filled_adapter(float(i + USERS * rng.randrange(1, 500))))
                    pool.invalidate(user)
                elif op < 0.4:
                    store.delete(user)
                    pool.invalidate(user)
                elif op < 0.6:
                    adapter, meta = read_adapter(store, user)
                    value = adapter.flat(LAYOUT)[0].item()
                    assert value_ok(user, value) and meta.user_id == user
                elif op < 0.7:
                    flat = store.load_flat(user)
                    assert value_ok(user, flat[0].item()) and bool((flat == flat[0]).all())
                else:
                    jobs.put(pool.request(user))
            except AdapterNotFound:
                pass
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def engine(pool: SlotPool, jobs: queue.Queue, stop: threading.Event, errors: list) -> None:
    """Acquire each ticket between 'steps', check the slot's contents, release soon after."""
    waiting, running, served = [], [], 0
    try:
        while not (stop.is_set() and jobs.empty() and not waiting and not running):
            while not jobs.empty():
                waiting.append(jobs.get())
            still = []
            for ticket in waiting:
                if ticket.error is not None:
                    assert isinstance(ticket.error, AdapterNotFound)  # deleted and collected
                    continue
                slot = pool.acquire(ticket)
                if slot is None:
                    still.append(ticket)
                    continue
                assert value_ok(ticket.user_id, pool.bank.rows[slot][0].item())
                running.append(slot)
            waiting = still
            for slot in running[: max(1, len(running) // 2)]:
                pool.release(slot)
            running = running[max(1, len(running) // 2) :] if running else []
            served += 1
            time.sleep(0.0005)
    except BaseException as e:  # noqa: BLE001
        errors.append(e)


def test_hammer(open_store) -> None:
    store = open_store(retain_s=0.05)
    pool = SlotPool(VeraBank(LAYOUT, 5), store, host_capacity=3, acquire_timeout_s=20.0)
    jobs: queue.Queue = queue.Queue()
    errors: list[BaseException] = []
    stop = threading.Event()
    eng = threading.Thread(target=engine, args=(pool, jobs, stop, errors))
    clients = [
        threading.Thread(target=client, args=(store, pool, seed, jobs, errors))
        for seed in range(CLIENTS)
    ]
    eng.start()
    for t in clients:
        t.start()
    for t in clients:
        t.join(timeout=60)
    stop.set()
    eng.join(timeout=30)
    assert not any(t.is_alive() for t in [*clients, eng]), "deadlock"
    assert not errors, errors[:3]
    s = pool.stats()
    assert s["slots_pinned"] == 0 and s["hits"] + s["misses"] > 300 and s["evictions"] > 0
    pool.close()
    metas = {m.user_id: m for m in store.list()}
    store.close()
    reopened = open_store()
    assert reopened.recovery.clean
    assert {m.user_id: m for m in reopened.list()} == metas
    for user in metas:
        flat = reopened.load_flat(user)
        assert value_ok(user, flat[0].item()) and torch.equal(flat, torch.full_like(flat, flat[0]))
    reopened.close()

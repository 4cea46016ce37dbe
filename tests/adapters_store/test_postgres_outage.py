"""The database goes away and comes back: quick StoreUnavailable, then automatic recovery.

These tests stop or kill the session's PostgreSQL server (``postgres`` fixture) and start it
again on the same port and data before they return.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import FP, KEY, LAYOUT, filled_adapter
from test_postgres import wait_for

from adapters_store import AdapterStore, StoreUnavailable, open_backend
from server.auth import KeyRegistry

QUICK_S = 3.5  # StoreUnavailable within the pool timeout plus a little scheduling slack


def raises_quickly(call: Callable[[], object]) -> str:
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        call()
    assert time.monotonic() - start < QUICK_S, f"took {time.monotonic() - start:.1f} s"
    return str(info.value)


@pytest.fixture
def secret_dsn(postgres) -> str:
    """A DSN with a password (trust authentication ignores it): it must never be shown."""
    return postgres.new_database().replace("postgres@", "postgres:s3cr3t-pw@")


def test_kill_gives_store_unavailable_then_everything_works_again(postgres, secret_dsn) -> None:
    backend = open_backend(secret_dsn)
    store, users = AdapterStore(backend, LAYOUT, KEY, FP), KeyRegistry(backend.db)
    key = users.create("alice")
    store.put("alice", filled_adapter(1.0))
    heard: list[str | None] = []
    backend.subscribe(heard.append)
    postgres.kill()
    calls = [
        lambda: store.meta("alice"),
        lambda: store.put("alice", filled_adapter(2.0)),
        lambda: store.load_flat("alice"),
        store.list,
        lambda: store.delete("alice"),
        lambda: users.authenticate(key),
        lambda: users.create("bob"),
    ]
    try:
        with ThreadPoolExecutor(len(calls)) as pool:  # all at once: each must give up quickly
            messages = list(pool.map(raises_quickly, calls))
    finally:
        postgres.start()
    for message in messages:
        assert "unreachable" in message and "s3cr3t" not in message, message
    assert "s3cr3t" not in backend.db.description
    assert store.meta("alice").version == 1  # the first request after the restart succeeds
    assert users.authenticate(key) == "alice"
    assert wait_for(lambda: None in heard, 10.0), heard  # the feed reconnected: revalidate
    other = open_backend(secret_dsn)
    AdapterStore(other, LAYOUT, KEY, FP).put("alice", filled_adapter(3.0))
    assert wait_for(lambda: heard[-1] == "alice", 2.0), heard  # and listens again
    assert store.load_flat("alice")[0].item() == 3.0
    other.close()
    store.close()


def test_fast_shutdown_and_restart_first_calls_succeed(postgres) -> None:
    """Pooled connections die with the server; the first read and write after it comes back
    succeed without re-creating the backend."""
    backend = open_backend(postgres.new_database())
    store = AdapterStore(backend, LAYOUT, KEY, FP)
    store.put("a", filled_adapter(1.0))
    pool = backend.db.pool
    with pool.connection(), pool.connection(), pool.connection():
        pass  # three idle connections now, all dead after the restart
    assert pool.get_stats()["pool_available"] == 3
    postgres.stop("fast")
    postgres.start()
    assert store.meta("a").version == 1
    postgres.stop("fast")
    postgres.start()
    assert store.put("a", filled_adapter(2.0)).version == 2
    store.close()

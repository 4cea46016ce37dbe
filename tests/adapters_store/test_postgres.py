"""What only the PostgreSQL backend has: a shared schema, several writer processes, NOTIFY."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import torch
from helpers import FP, KEY, LAYOUT, filled_adapter, flip_last_byte, stamped_bytes
from test_crash import USERS, acked, kill, start_writer

import adapters_store.backend
from adapters_store import AdapterBackend, AdapterStore, open_backend


@pytest.fixture
def dsn(postgres) -> str:
    return postgres.new_database()


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def sql(dsn: str, query: str, args: tuple = ()) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, args)
        return cur.fetchall() if cur.description else []


def open_at_once(dsn: str, count: int) -> list[AdapterBackend]:
    """``count`` backends whose constructors start together (as replicas booting at once)."""
    barrier = threading.Barrier(count)

    def start() -> AdapterBackend:
        barrier.wait()
        return open_backend(dsn)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: start(), range(count)))


def test_replicas_starting_at_once_on_a_fresh_database_all_succeed(postgres) -> None:
    for _ in range(3):
        dsn = postgres.new_database()
        backends = open_at_once(dsn, 4)  # raises if any of them failed
        applied = sql(dsn, "SELECT component, version FROM vera_migrations ORDER BY 1, 2")
        assert applied == [("adapters", 1), ("adapters", 2), ("blobs", 1), ("blobs", 2)]
        for backend in backends:
            backend.close()


def test_two_writer_processes_on_the_same_users(dsn: str) -> None:
    """Versions are unique and increasing per user, and the current one is the newest."""
    writers = [start_writer(dsn, 1), start_writer(dsn, 5_001)]  # values stay < 1e4: valid
    time.sleep(1.0)
    outputs = [kill(proc) for proc in writers]
    versions: dict[str, dict[int, int]] = {}  # user -> version -> value put
    for lines in outputs:
        last: dict[str, int] = {}
        for line in lines:
            if line.startswith("OK "):
                _, user, k, v = line.split()
                assert int(v) > last.get(user, 0), "versions of one writer must increase"
                last[user] = int(v)
                assert int(v) not in versions.setdefault(user, {}), "a version was reused"
                versions[user][int(v)] = int(k)
    assert all(len(acked(lines)) == USERS for lines in outputs), "both writers made progress"
    with AdapterStore(open_backend(dsn), LAYOUT, KEY, FP) as store:
        for user, by_version in versions.items():
            meta = store.meta(user)
            assert meta.version >= max(by_version)  # a put after the last OK may have landed
            value = store.load_flat(user)[0].item()
            if meta.version in by_version:
                assert value == by_version[meta.version]


def test_a_publish_that_fails_before_commit_leaves_nothing(dsn: str, monkeypatch) -> None:
    store = AdapterStore(open_backend(dsn), LAYOUT, KEY, FP)
    heard: list[str | None] = []
    store.backend.subscribe(heard.append)
    store.put("a", filled_adapter(1.0))

    def crash(name: str) -> None:
        if name == "blob_written":
            raise RuntimeError("writer died between blob and index commit")

    monkeypatch.setattr(adapters_store.backend, "failpoint", crash)
    with pytest.raises(RuntimeError):
        store.put("a", filled_adapter(2.0))
    monkeypatch.undo()
    assert store.meta("a").version == 1 and store.load_flat("a")[0].item() == 1.0
    assert sql(dsn, "SELECT version FROM vera_blobs") == [(1,)]  # its blob was deleted
    assert store.put("a", filled_adapter(3.0)).version == 3  # v2 stays a gap, never visible
    assert wait_for(lambda: heard == ["a", "a"]), heard  # the rolled-back put announced nothing
    store.close()


def test_recovery_drops_rows_without_a_sound_blob_and_unindexed_blobs(dsn: str) -> None:
    first = AdapterStore(open_backend(dsn), LAYOUT, KEY, FP)
    for user in ("gone", "damaged", "fine"):
        first.put(user, filled_adapter(1.0))
    first.close()
    sql(dsn, "DELETE FROM vera_blobs WHERE user_id = 'gone'")
    backend = open_backend(dsn)
    flip_last_byte(backend, "damaged", 1)
    orphan = stamped_bytes(filled_adapter(9.0))
    insert = "INSERT INTO vera_blobs VALUES (%s, %s, %s, now() - %s * interval '1 second')"
    sql(dsn, insert, ("orphan", 4, orphan, backend.grace_s + 60))  # a crash long ago
    sql(dsn, insert, ("in-flight", 1, orphan, 1))  # another replica's publish, not committed yet
    unverified = AdapterStore(backend, LAYOUT, KEY, FP, verify_on_open=False)
    assert unverified.recovery.rows_dropped == ["gone/v1"]  # sizes are always checked
    assert unverified.recovery.files_removed == ["orphan/v4"]  # never adopted on a shared store
    assert sql(dsn, "SELECT user_id FROM vera_blobs WHERE version > 1") == []
    assert sql(dsn, "SELECT user_id FROM vera_blobs WHERE user_id = 'in-flight'") != []
    unverified.close()
    second = AdapterStore(open_backend(dsn), LAYOUT, KEY, FP)
    assert second.recovery.rows_dropped == ["damaged/v1"]
    assert [m.user_id for m in second.list()] == ["fine"]
    assert torch.equal(second.load_flat("fine"), torch.ones(LAYOUT.num_params))
    assert second.put("gone", filled_adapter(2.0)).version == 2  # the counter survived
    third = AdapterStore(open_backend(dsn), LAYOUT, KEY, FP)
    assert third.recovery.clean
    second.close()
    third.close()


def test_change_feed_hears_other_backends_writes(dsn: str) -> None:
    writer, reader = open_backend(dsn), open_backend(dsn)
    heard: list[str | None] = []
    reader.subscribe(heard.append)
    data = stamped_bytes(filled_adapter(1.0))
    sha = hashlib.sha256(data).hexdigest()
    start = time.monotonic()
    writer.publish("alice", data, sha, LAYOUT.num_params, FP)
    assert wait_for(lambda: heard == ["alice"], 2.0), heard
    writer.remove("alice")
    writer.remove("alice")  # nothing to retire: nothing announced
    writer.publish("bob", data, sha, LAYOUT.num_params, FP)
    assert wait_for(lambda: heard == ["alice", "alice", "bob"], 2.0), heard
    assert time.monotonic() - start < 3.0
    reader.close()
    writer.publish("carol", data, sha, LAYOUT.num_params, FP)
    time.sleep(0.2)
    assert heard[-1] == "bob"  # closed: the listener thread is gone
    writer.close()

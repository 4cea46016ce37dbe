"""Per-user limits, rate limits and usage metering, without HTTP or a model; on both databases
where they live in it (a directory's SQLite, a PostgreSQL database shared by replicas)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from adapters_store import Database, StoreUnavailable, open_database
from server.tenants import LimitRegistry, Limits, RateLimited, RateLimiter, UsageMeter
from server.tenants.rate_limits import DbLedger, LocalLedger

DEFAULT = Limits(
    weight=1.0, requests_per_minute=0, tokens_per_minute=0, max_concurrent=0, max_queued=64
)


@pytest.fixture(params=["sqlite", "postgres"])
def open_db(request, tmp_path: Path) -> Iterator[Callable[[], Database]]:
    """open_db() -> a new handle on this test's database (another replica on PostgreSQL)."""
    location = str(tmp_path / "store")
    if request.param == "postgres":
        location = request.getfixturevalue("postgres").new_database()
    opened: list[Database] = []

    def _open() -> Database:
        opened.append(open_database(location))
        return opened[-1]

    yield _open
    for db in opened:
        db.close()


# -- limits ---------------------------------------------------------------------------------
def test_overrides_on_top_of_defaults_and_shared_by_replicas(open_db) -> None:
    a, b = LimitRegistry(open_db(), DEFAULT, ttl_s=0.0), LimitRegistry(open_db(), DEFAULT)
    assert a.effective("alice") == DEFAULT and a.weight("alice") == 1.0
    a.set("alice", Limits(weight=3.0, requests_per_minute=10))
    assert a.effective("alice") == Limits(3.0, 10, 0, 0, 64)  # the rest stays the default
    assert a.weight("alice") == 3.0 and a.max_waiting("alice") == 64
    b.refresh(force=True)
    assert b.effective("alice").requests_per_minute == 10  # every replica applies it
    a.set("alice", Limits())  # all defaults again: the override is gone
    assert a.overrides() == {} and a.effective("alice") == DEFAULT
    with pytest.raises(ValueError):
        Limits(weight=0)
    with pytest.raises(ValueError):
        Limits(requests_per_minute=-1)


def test_reads_never_wait_for_the_database(tmp_path: Path) -> None:
    """The engine thread reads weights: from memory, and through an outage."""
    db = open_database(tmp_path / "store")
    limits = LimitRegistry(db, DEFAULT, ttl_s=0.0)
    limits.set("gold", Limits(weight=2.0))
    broken = SimpleNamespace(run=lambda *a, **k: (_ for _ in ()).throw(StoreUnavailable("down")))
    limits._db = broken  # the database goes away
    limits.refresh()  # keeps the last copy
    assert limits.weight("gold") == 2.0
    db.close()


# -- rate limits ----------------------------------------------------------------------------
def limiter(per_user: Limits, ledger=None, db: Database | None = None) -> RateLimiter:
    registry = LimitRegistry(db, DEFAULT) if db is not None else _memory_registry()
    registry.set("u", per_user)
    return RateLimiter(registry, ledger or LocalLedger())


def _memory_registry() -> LimitRegistry:
    class Memory(LimitRegistry):
        def __init__(self) -> None:  # no database: overrides in memory only
            self.default, self.ttl_s, self._overrides = DEFAULT, 1e9, {}
            self._lock, self._loaded_at = threading.Lock(), time.monotonic()

        def set(self, user_id: str, limits: Limits) -> Limits:
            self._overrides[user_id] = limits
            return limits

    return Memory()


def test_requests_per_minute_exact_with_openai_headers() -> None:
    rl = limiter(Limits(requests_per_minute=3))
    permits = [rl.admit("u", 10) for _ in range(3)]
    assert permits[0].headers["x-ratelimit-limit-requests"] == "3"
    assert [p.headers["x-ratelimit-remaining-requests"] for p in permits] == ["2", "1", "0"]
    with pytest.raises(RateLimited, match="3 requests per minute") as refused:
        rl.admit("u", 10)
    headers = refused.value.headers
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert rl.admit("other", 10).headers == {}  # users without limits: no cost, no headers
    assert rl.refused == 1


def test_the_window_slides(monkeypatch) -> None:
    rl = limiter(Limits(requests_per_minute=2))
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    rl.admit("u", 1)
    clock[0] += 30
    rl.admit("u", 1)
    clock[0] += 29
    with pytest.raises(RateLimited):
        rl.admit("u", 1)  # two in the last 60 s, whatever the clock's minute
    clock[0] += 1.5  # the first one left the window
    assert rl.admit("u", 1).headers["x-ratelimit-remaining-requests"] == "0"


def test_tokens_per_minute_count_prompt_and_max_tokens() -> None:
    rl = limiter(Limits(tokens_per_minute=100))
    rl.admit("u", 60)
    p = rl.admit("u", 40)
    assert p.headers["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(RateLimited, match="100 tokens per minute"):
        rl.admit("u", 1)
    with pytest.raises(RateLimited, match="more than the 100 tokens per minute"):
        limiter(Limits(tokens_per_minute=100)).admit("u", 101)  # can never pass


def test_concurrent_requests_are_held_until_released() -> None:
    rl = limiter(Limits(max_concurrent=2))
    a, b = rl.admit("u", 1), rl.admit("u", 1)
    with pytest.raises(RateLimited, match="2 requests in flight"):
        rl.admit("u", 1)
    a.release()
    a.release()  # idempotent
    c = rl.admit("u", 1)
    b.release(), c.release()
    assert rl.ledger._in_flight == {}  # type: ignore[attr-defined]


def test_limits_hold_across_replicas_on_a_shared_database(postgres) -> None:
    """Two replicas' limiters on one PostgreSQL database: 10 requests per minute in all, not
    10 each; concurrent admissions never exceed the in-flight limit."""
    dsn = postgres.new_database()
    dbs = [open_database(dsn) for _ in range(2)]
    try:
        LimitRegistry(dbs[0], DEFAULT).set("u", Limits(requests_per_minute=10, max_concurrent=4))
        replicas = [
            RateLimiter(LimitRegistry(db, DEFAULT), DbLedger(db, f"replica-{i}"))
            for i, db in enumerate(dbs)
        ]
        admitted, refused, permits = [0], [0], []
        lock = threading.Lock()

        def client(rl: RateLimiter) -> None:
            for _ in range(8):
                try:
                    permit = rl.admit("u", 1)
                except RateLimited:
                    with lock:
                        refused[0] += 1
                    continue
                with lock:
                    admitted[0] += 1
                    permits.append(permit)
                    assert len(permits) <= 4  # never more in flight than allowed
                time.sleep(0.01)
                with lock:
                    permits.remove(permit)
                permit.release()

        threads = [threading.Thread(target=client, args=(rl,)) for rl in replicas * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert admitted[0] == 10 and refused[0] == 22  # exact across replicas
        replicas[0].ledger.heartbeat()  # type: ignore[attr-defined]
        assert replicas[1].ledger.take("u", 0, Limits(), time.time()).in_flight == 0
    finally:
        for db in dbs:
            db.close()


# -- usage ----------------------------------------------------------------------------------
def merged(buckets: list[dict]) -> dict[tuple, dict]:
    """Every bucket's results added up by group (a query window may span two buckets)."""
    out: dict[tuple, dict] = {}
    keys = ("num_model_requests", "input_tokens", "output_tokens", "training_tokens")
    for bucket in buckets:
        for r in bucket["results"]:
            group = (r["user_id"], r["api_key_id"], r["model"])
            row = out.setdefault(group, dict.fromkeys(keys, 0) | {"engine_seconds": 0.0})
            for k in (*keys, "engine_seconds"):
                row[k] += r[k]
    return out


def finished(client: str, key: str | None, user: str | None, prompt: int, out: int):
    return SimpleNamespace(
        client=client,
        key_id=key,
        user_id=user,
        adapter_version=1 if user else None,
        prompt_ids=[0] * prompt,
        output_ids=[0] * out,
        engine_seconds=0.25,
    )


def test_usage_buckets_groups_and_replicas_add_up(open_db) -> None:
    db_a, db_b = open_db(), open_db()
    a, b = UsageMeter(db_a, "base"), UsageMeter(db_b, "base")
    now = int(time.time())
    a.finished(finished("alice", "key_1", "alice", 10, 5), "stop")
    a.finished(finished("alice", "key_1", None, 3, 2), "length")
    a.trained("alice", 40)
    b.finished(finished("bob", None, None, 7, 1), "cancelled")
    assert a.flush() == 3  # three buckets (alice's adapter, alice on base, alice's training)
    # b's counts are still pending: a query on b includes them
    (total,) = merged(b.query(now - 60, now + 60, "1h")).values()
    assert (total["num_model_requests"], total["input_tokens"], total["output_tokens"]) == (
        3,
        20,
        8,
    )
    assert total["training_tokens"] == 40 and total["engine_seconds"] == 0.75
    grouped = merged(a.query(now - 60, now + 60, "1d", ("user_id", "model")))  # b flushed: both
    rows = {(user, model): r for (user, _, model), r in grouped.items()}
    assert set(rows) == {
        ("alice", "alice@v1"),
        ("alice", "base"),
        ("alice", "alice@training"),
        ("bob", "base"),
    }
    assert rows[("alice", "alice@v1")]["output_tokens"] == 5
    mine = merged(a.query(now - 60, now + 60, "1d", ("api_key_id",), user_ids=("bob",)))
    assert list(mine) == [(None, None, None)]  # grouped by key only; bob had no key: null
    minutes = a.query(now - 120, now + 60, "1m")
    assert len(minutes) >= 3 and 1 <= sum(len(m["results"]) for m in minutes) <= 2


def test_a_flush_that_cannot_reach_the_store_keeps_its_counts(tmp_path: Path) -> None:
    db = open_database(tmp_path / "store")
    meter = UsageMeter(db, "base")
    meter.finished(finished("alice", None, None, 4, 4), "stop")
    real = meter._db
    meter._db = SimpleNamespace(run=lambda *a, **k: (_ for _ in ()).throw(StoreUnavailable("x")))
    assert meter.flush() == 0
    meter._db = real
    meter.stop()  # a clean stop flushes what is left
    now = int(time.time())
    assert (
        UsageMeter(db, "base").query(now - 60, now + 60, "1d")[0]["results"][0][
            "num_model_requests"
        ]
        == 1
    )
    db.close()

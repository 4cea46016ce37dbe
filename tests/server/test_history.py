"""The stats history ring, without a server: columns, bounds, ``since``, failures, lifecycle."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from server.api.history import COLUMNS, StatsHistory, pick


def stats(tokens_per_s: float = 1.5, disk: int | None = 3) -> dict[str, Any]:
    """The shape of ``collect_stats``'s answer, the parts the history reads."""
    return {
        "memory": {"host_rss_bytes": 1000, "kv_cache_bytes": 64},
        "adapters": {
            "device": {"adapters": 2, "bytes": 200},
            "host": {"adapters": 3, "bytes": 300, "capacity": 10},
            "disk": {"adapters": disk, "bytes": None if disk is None else 900, "reachable": True},
        },
        "engine": {
            "queue_depth": 4,
            "running_batch": 5,
            "kv_cache_bytes": 64,
            "tokens_per_s": tokens_per_s,
            "requests_submitted": 7,
            "completion_tokens": 8,
            "preemptions": 1,
            "ttft_ms": {"p50": 12.5, "p90": 20.0, "p99": 31.0, "count": 9},
        },
    }


def test_pick_reads_numbers_only() -> None:
    s = stats()
    assert pick(s, "engine.ttft_ms.p99") == 31.0
    assert pick(s, "adapters.host.adapters") == 3
    assert pick(s, "memory.device_allocated_bytes") is None  # absent on a CPU server
    assert pick(s, "engine.queue_depth.deeper") is None
    assert pick({"a": True}, "a") is None and pick({"a": "7"}, "a") is None


def test_columns_are_aligned_and_named() -> None:
    history = StatsHistory(stats)
    for _ in range(3):
        assert history.sample()
    out = history.columns()
    assert out["interval_s"] == 2.0 and out["window_s"] == 1800.0
    cols = out["columns"]
    assert list(cols) == ["t", *COLUMNS]
    assert {len(v) for v in cols.values()} == {3}
    assert cols["ttft_p50_ms"] == [12.5] * 3 and cols["device_bytes"] == [200] * 3
    assert cols["device_allocated_bytes"] == [None] * 3
    assert cols["t"] == sorted(cols["t"]) and abs(cols["t"][-1] - time.time()) < 5


def test_ring_is_bounded_and_since_gives_only_newer_rows() -> None:
    history = StatsHistory(stats, interval_s=1, window_s=5)
    for _ in range(12):
        history.sample()
        time.sleep(0.002)  # distinct timestamps
    t = history.columns()["columns"]["t"]
    assert len(t) == 5  # window_s / interval_s
    newer = history.columns(since=t[2])["columns"]
    assert newer["t"] == t[3:] and len(newer["queue_depth"]) == 2
    assert history.columns(since=t[-1])["columns"]["t"] == []


def test_a_store_outage_leaves_the_store_tier_null() -> None:
    history = StatsHistory(lambda: stats(disk=None))
    history.sample()
    cols = history.columns()["columns"]
    assert cols["disk_adapters"] == [None] and cols["disk_bytes"] == [None]
    assert cols["host_adapters"] == [3]


def test_a_failing_read_is_skipped_and_sampling_goes_on(caplog) -> None:
    calls = {"n": 0}

    def flaky() -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] in (2, 3):
            raise RuntimeError("store timed out")
        return stats(tokens_per_s=calls["n"])

    history = StatsHistory(flaky)
    results = [history.sample() for _ in range(4)]
    assert results == [True, False, False, True]
    assert history.columns()["columns"]["tokens_per_s"] == [1, 4]
    assert sum("a sample failed" in r.message for r in caplog.records) == 1  # logged once


def test_thread_samples_until_stopped_and_lifecycle_is_idempotent() -> None:
    seen = threading.Event()

    def read() -> dict[str, Any]:
        seen.set()
        return stats()

    history = StatsHistory(read, interval_s=0.02, window_s=10)
    history.start()
    history.start()  # a second start is a no-op
    assert seen.wait(5)
    time.sleep(0.15)
    history.stop()
    history.stop()
    n = len(history.columns()["columns"]["t"])
    assert n >= 3
    time.sleep(0.1)
    assert len(history.columns()["columns"]["t"]) == n  # stopped means stopped


@pytest.mark.parametrize(("interval", "window"), [(0, 10), (-1, 10), (5, 1)])
def test_bad_intervals_are_refused(interval: float, window: float) -> None:
    with pytest.raises(ValueError):
        StatsHistory(stats, interval_s=interval, window_s=window)

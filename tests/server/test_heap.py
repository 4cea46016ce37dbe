"""The heap releaser gives malloc's free pages back once the server is idle, never while busy."""

from __future__ import annotations

import ctypes

import psutil
import pytest

from server.heap import HeapReleaser


def _fragment_heap(n: int = 4000, size: int = 64 << 10) -> list[int]:
    """Malloc ``n`` chunks below the mmap threshold and free every other one: the freed half
    sits between live chunks, which malloc cannot give back by shrinking its heap's top."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    chunks = [libc.malloc(size) for _ in range(n)]
    for p in chunks:
        ctypes.memset(p, 1, size)  # touched: resident
    for p in chunks[::2]:
        libc.free(p)
    return chunks[1::2]


def _free(chunks: list[int]) -> None:
    libc = ctypes.CDLL(None)
    libc.free.argtypes = [ctypes.c_void_p]
    for p in chunks:
        libc.free(p)


@pytest.fixture()
def releaser() -> HeapReleaser:
    r = HeapReleaser(idle=lambda: True, growth_bytes=16 << 20)
    if not r.available:
        pytest.skip("malloc_trim needs glibc")
    return r


def test_release_gives_the_free_pages_back(releaser: HeapReleaser) -> None:
    live = _fragment_heap()  # 125 MiB freed between 125 MiB still in use
    try:
        held = releaser.stats()["free_bytes"]
        assert held >= 100 << 20, releaser.stats()
        rss = psutil.Process().memory_info().rss
        freed = releaser.release()
        assert freed >= 64 << 20 and psutil.Process().memory_info().rss <= rss - (64 << 20)
        assert releaser.trims == 1 and releaser.released_bytes == freed
        assert releaser.last_trim_at is not None and releaser.last_trim_ms is not None
    finally:
        _free(live)


def test_check_trims_only_when_idle_and_grown(releaser: HeapReleaser) -> None:
    busy = [True]
    releaser.idle = lambda: not busy[0]
    releaser.release()  # the baseline: RSS now
    live = _fragment_heap()
    try:
        assert not releaser.check()  # grown, but the engine is busy: a trim would stall it
        busy[0] = False
        assert releaser.check() and releaser.trims == 2
        assert not releaser.check()  # nothing grew since: no trim
        assert releaser.trims == 2
    finally:
        _free(live)


def test_stats_say_what_malloc_holds(releaser: HeapReleaser) -> None:
    stats = releaser.stats()
    assert stats["available"] and stats["trims"] == 0 and stats["released_bytes"] == 0
    assert stats["in_use_bytes"] > 0 and stats["free_bytes"] >= 0
    assert stats["last_trim_at"] is None

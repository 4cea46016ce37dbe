"""Benchmark of adapters_store on the default model's layout (r=256, q,v). Not a test.

Measures: registration rate; disk -> device slot latency (warm page cache, and cold via
posix_fadvise DONTNEED); memory per resident adapter against ``sum_l(r + out_l) * 4`` bytes
(host tier by RSS delta, device tier by bank bytes); a churn of upload/request/delete cycles with
RSS and file count before and after. Prints one markdown table.

With ``--store postgresql://...`` (an empty scratch database) a second table sets the local and
the PostgreSQL backend side by side: publish rate, ``meta()`` latency (the admission check of
every request) and disk -> slot latency on warm caches.

    .venv/bin/python bench/bench_store.py --n 10000
    .venv/bin/python bench/bench_store.py --n 300 --store postgresql://vera@127.0.0.1/scratch
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import psutil
import torch

from adapters_store import AdapterBackend, AdapterStore, open_backend
from server.engine import SlotPool, SlotTicket
from vera_core import Adapter, AdapterHeader, Layout, VeraBank, VeraConfig, model_fingerprint
from vera_core.inject import layout_for

Row = tuple[str, str, str]  # metric, value, target / note


def wait_host(ticket: SlotTicket, timeout: float) -> None:
    """Until the ticket's adapter is in host memory (or its load failed)."""
    if ticket.host is not None:
        ticket.host.done.wait(timeout)


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def default_layout() -> tuple[Layout, str]:
    from server.model_source import load_model  # bench may use server/; the package may not

    model, _, _ = load_model()
    layout = layout_for(model, VeraConfig(r=256))
    return layout, model_fingerprint(model)


def make_adapters(layout: Layout, fp: str, count: int) -> list[Adapter]:
    header = AdapterHeader(layout.r, 0, ("q_proj", "v_proj"), fp)
    g = torch.Generator().manual_seed(0)
    return [
        Adapter.from_flat(header, layout, 0.1 * torch.randn(layout.num_params, generator=g))
        for _ in range(count)
    ]


def bench_register(store: AdapterStore, adapters: list[Adapter], n: int) -> list[Row]:
    start = time.perf_counter()
    for i in range(n):
        store.put(f"user{i:05d}", adapters[i % len(adapters)])
    elapsed = time.perf_counter() - start
    size = store.meta("user00000").bytes
    return [
        ("adapters registered", f"{n:,}", f"{size / 1024:.1f} KiB file each"),
        ("registration rate", f"{n / elapsed:,.0f} /s", f"{elapsed:.1f} s total, fsync'd"),
    ]


def drop_page_cache(store: AdapterStore, user: str) -> None:
    meta = store.meta(user)
    fd = os.open(store.backend.path(user, meta.version), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_slot_load(store: AdapterStore, n: int, loads: int, cold: bool) -> list[Row]:
    """request -> host copy -> acquire (row copy) for users resident in neither tier."""
    bank = VeraBank(store.layout, 65)
    pool = SlotPool(bank, store, host_capacity=8)
    users = [f"user{i:05d}" for i in range(0, n, max(1, n // loads))][:loads]
    samples = []
    for user in users:
        if cold:
            drop_page_cache(store, user)
        start = time.perf_counter()
        ticket = pool.request(user)
        wait_host(ticket, 10.0)
        slot = pool.acquire(ticket)
        samples.append((time.perf_counter() - start) * 1e3)
        assert slot is not None
        pool.release(slot)
    pool.close()
    label = "cold (fadvise DONTNEED)" if cold else "warm page cache"
    return [
        (
            f"disk -> slot p50 / p99, {label}",
            f"{pct(samples, 0.5):.2f} / {pct(samples, 0.99):.2f} ms",
            f"target p50 <= 5 ms; {len(samples)} loads",
        )
    ]


def bench_memory(store: AdapterStore, n: int, resident: int) -> list[Row]:
    theory = store.layout.num_params * 4  # sum_l (r + out_l) * float32 bytes
    bank = VeraBank(store.layout, resident + 1)
    device_each = bank.nbytes() / bank.num_slots
    pool = SlotPool(bank, store, host_capacity=resident)
    before = rss()
    tickets = [pool.request(f"user{i:05d}") for i in range(min(n, resident))]
    for t in tickets:
        wait_host(t, 30.0)
    del tickets
    host_each = (rss() - before) / min(n, resident)
    host_exact = pool.stats()["host"]["bytes"] / min(n, resident)
    pool.close()
    over = lambda x: f"{100 * (x / theory - 1):+.2f}%"  # noqa: E731
    return [
        ("theoretical bytes / adapter", f"{theory:,}", f"num_params={store.layout.num_params:,}"),
        ("device slot bytes / adapter", f"{device_each:,.0f}", f"overhead {over(device_each)}"),
        ("host tensor bytes / adapter", f"{host_exact:,.0f}", f"overhead {over(host_exact)}"),
        (
            "host RSS delta / adapter",
            f"{host_each:,.0f}",
            f"overhead {over(host_each)}, {resident} resident",
        ),
    ]


def churn_cycle(store: AdapterStore, pool: SlotPool, user: str, adapter: Adapter) -> None:
    """upload -> request -> slot -> release -> delete -> invalidate."""
    store.put(user, adapter)
    ticket = pool.request(user)
    wait_host(ticket, 10.0)
    slot = pool.acquire(ticket)
    assert slot is not None
    pool.release(slot)
    store.delete(user)
    pool.invalidate(user)


def bench_churn(store: AdapterStore, adapters: list[Adapter], cycles: int) -> list[Row]:
    pool = SlotPool(VeraBank(store.layout, 17), store, host_capacity=8)
    warmup = max(1, cycles // 10)
    for i in range(warmup):
        churn_cycle(store, pool, f"churn{i % 100:03d}", adapters[i % len(adapters)])
    before = rss()
    start = time.perf_counter()
    for i in range(warmup, cycles):
        churn_cycle(store, pool, f"churn{i % 100:03d}", adapters[i % len(adapters)])
    elapsed = time.perf_counter() - start
    after = rss()
    files = sum(1 for _ in Path(store.backend.root, "adapters").glob("churn*/*"))
    stats = pool.stats()
    pool.close()
    return [
        (
            "churn cycles (put/slot/delete)",
            f"{cycles:,}",
            f"{(cycles - warmup) / elapsed:,.0f} cycles/s",
        ),
        (
            "churn RSS change after warmup",
            f"{(after - before) / 2**20:+.1f} MiB",
            f"{before / 2**20:,.0f} -> {after / 2**20:,.0f} MiB",
        ),
        (
            "churn files left / slots used",
            f"{files} / {stats['slots_used']}",
            "retain_s=0: all collected",
        ),
    ]


def backend_figures(store: AdapterStore, adapters: list[Adapter], n: int, loads: int) -> list[str]:
    """[publish rate, meta() p50 / p99, disk -> slot p50 / p99 warm] of ``store``'s backend."""
    start = time.perf_counter()
    for i in range(n):
        store.put(f"bench{i:05d}", adapters[i % len(adapters)])
    rate = n / (time.perf_counter() - start)
    users = [f"bench{i % n:05d}" for i in range(max(loads, 1000))]
    samples = []
    for user in users:
        t0 = time.perf_counter()
        store.meta(user)
        samples.append((time.perf_counter() - t0) * 1e3)
    pool = SlotPool(VeraBank(store.layout, 65), store, host_capacity=8)
    slot_ms = []
    for user in users[: min(loads, n)]:  # distinct users: resident in neither tier
        t0 = time.perf_counter()
        ticket = pool.request(user)
        wait_host(ticket, 10.0)
        slot = pool.acquire(ticket)
        slot_ms.append((time.perf_counter() - t0) * 1e3)
        assert slot is not None
        pool.release(slot)
    pool.close()
    for i in range(n):
        store.delete(f"bench{i:05d}")
    store.backend.collect_garbage()
    return [
        f"{rate:,.0f} /s",
        f"{pct(samples, 0.5):.3f} / {pct(samples, 0.99):.3f} ms",
        f"{pct(slot_ms, 0.5):.2f} / {pct(slot_ms, 0.99):.2f} ms",
    ]


def compare_backends(layout: Layout, fp: str, adapters: list[Adapter], args) -> str:
    """A markdown table: the local and the PostgreSQL backend, same adapters, same run."""
    columns = []
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        backends: list[AdapterBackend] = [
            open_backend(tmp, retain_s=0.0),
            open_backend(args.store, retain_s=0.0),
        ]
        for backend in backends:
            with AdapterStore(backend, layout, 0, fp) as store:
                columns.append(backend_figures(store, adapters, args.n, args.loads))
    names = ["publish (put) rate", "meta() p50 / p99", "disk -> slot p50 / p99, warm"]
    head = f"| {args.n:,} adapters | local (dir + SQLite) | PostgreSQL |\n|---|---|---|\n"
    return head + "\n".join(f"| {name} | {a} | {b} |" for name, a, b in zip(names, *columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="adapters to register")
    parser.add_argument("--loads", type=int, default=1000, help="slot loads to time")
    parser.add_argument("--resident", type=int, default=1000, help="host copies for memory")
    parser.add_argument("--churn", type=int, default=None, help="cycles (default: --n)")
    parser.add_argument("--root", type=Path, default=None, help="store dir (default: temp)")
    parser.add_argument("--store", default=None, help="postgresql:// DSN: compare backends")
    args = parser.parse_args()
    torch.set_num_threads(1)
    layout, fp = default_layout()
    adapters = make_adapters(layout, fp, 32)
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        store = AdapterStore(tmp, layout, 0, fp, retain_s=0.0)
        rows = bench_register(store, adapters, args.n)
        rows += bench_slot_load(store, args.n, args.loads, cold=False)
        rows += bench_slot_load(store, args.n, args.loads, cold=True)
        rows += bench_memory(store, args.n, args.resident)
        rows += bench_churn(store, adapters, args.churn or args.n)
        start = time.perf_counter()
        store.close()
        reopened = AdapterStore(tmp, layout, 0, fp)
        rows.append(
            (
                "reopen + full sha256 recovery",
                f"{time.perf_counter() - start:.2f} s",
                f"{len(reopened.list()):,} adapters, clean={reopened.recovery.clean}",
            )
        )
        reopened.close()
    n_layers = len(layout.layers)
    print(f"\nlayout: r={layout.r}, {n_layers} adapted layers, num_params={layout.num_params:,}\n")
    print("| metric | value | note |\n|---|---|---|")
    for metric, value, note in rows:
        print(f"| {metric} | {value} | {note} |")
    if args.store:
        print(f"\n{compare_backends(layout, fp, adapters, args)}")


if __name__ == "__main__":
    main()

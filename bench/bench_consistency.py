"""What read-your-writes across replicas costs, measured in one run. Not a test.

1. The admission check: ``AdapterStore.meta(user)`` (one index lookup per request) on the
   local SQLite index vs the shared PostgreSQL store, p50/p99 over many lookups.
2. The change feed: time from one process's publish commit to another's LISTEN callback
   (what frees stale copies early; correctness does not wait for it).
3. End to end on the real default model: upload through replica A, then at once a 1-token
   generate through replica B, which must already run the new version; next to the same
   upload -> generate on one plain ``vera-serve serve`` with a local store (the baseline).

    .venv/bin/python bench/bench_consistency.py --lookups 3000 --rounds 40

Starts its own throwaway PostgreSQL (``tests/pg_server.py``) and servers on loopback.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "server")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from live import adapter_bytes, random_adapter, start_server  # noqa: E402
from pg_server import PgServer, find_bindir  # noqa: E402

from adapters_store import AdapterStore  # noqa: E402
from server.model_source import load_model  # noqa: E402
from server.storage import open_storage  # noqa: E402
from vera_core import VeraConfig, inject_vera, model_fingerprint  # noqa: E402

OCTET = {"Content-Type": "application/octet-stream"}


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(samples: list[float]) -> str:
    return f"{pct(samples, 0.5) * 1e3:.3f} / {pct(samples, 0.99) * 1e3:.3f}"


def lookup_latency(location: str, vm, lookups: int) -> list[float]:
    storage = open_storage(location)
    store = AdapterStore(storage.adapters, vm.layout, 0, model_fingerprint(vm.model))
    for i in range(50):
        store.put(f"user{i}", random_adapter(vm, i))
    samples = []
    for i in range(lookups):
        start = time.perf_counter()
        store.meta(f"user{i % 50}")
        samples.append(time.perf_counter() - start)
    storage.close()
    return samples


def feed_latency(dsn: str, vm, rounds: int) -> tuple[list[float], list[float]]:
    """Publish on one backend; seconds until another backend's subscriber hears it, and until
    the writer's own put returns (both from the start of the put)."""
    writer, reader = open_storage(dsn), open_storage(dsn)
    store = AdapterStore(writer.adapters, vm.layout, 0, model_fingerprint(vm.model))
    heard: dict[str, float] = {}
    event = threading.Event()

    def on_change(user_id: str | None) -> None:
        if user_id is not None:
            heard[user_id] = time.perf_counter()
            event.set()

    reader.adapters.subscribe(on_change)
    time.sleep(0.5)  # LISTEN is up
    adapter, heard_after, acked_after = random_adapter(vm, 1), [], []
    for i in range(rounds):
        event.clear()
        start = time.perf_counter()
        store.put(f"feed{i}", adapter)
        acked_after.append(time.perf_counter() - start)
        assert event.wait(10), "no notification"
        heard_after.append(heard[f"feed{i}"] - start)
    reader.close(), writer.close()
    return heard_after, acked_after


def upload_then_generate(writer, reader, key: str, vm, rounds: int) -> list[float]:
    """Seconds from the upload's 201 through ``writer`` to ``reader``'s answer, which must
    name the version just acknowledged."""
    samples = []
    with writer.client(key) as w, reader.client(key) as r:
        for i in range(rounds):
            body = adapter_bytes(random_adapter(vm, 1000 + i))
            put = w.put("/users/bench/adapter", content=body, headers=OCTET)
            assert put.status_code == 201, put.text
            acked = time.perf_counter()
            gen = r.post(
                "/generate", json={"user_id": "bench", "prompt": "Hi", "max_new_tokens": 1}
            )
            samples.append(time.perf_counter() - acked)
            assert gen.status_code == 200, gen.text
            assert gen.json()["adapter_version"] == put.json()["version"], "stale answer"
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lookups", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    bindir = find_bindir()
    if bindir is None:
        sys.exit("PostgreSQL server binaries not found (apt-get install postgresql)")
    model, _, _ = load_model()
    vm = inject_vera(model, VeraConfig(r=256), num_slots=2)
    pg = PgServer(bindir)
    work = Path(tempfile.mkdtemp(prefix="bench-consistency-"))
    rows: list[tuple[str, str]] = []
    try:
        local = lookup_latency(str(work / "local-store"), vm, args.lookups)
        shared = lookup_latency(pg.new_database(), vm, args.lookups)
        rows.append(("admission check, local SQLite index (ms p50 / p99)", ms(local)))
        rows.append(("admission check, PostgreSQL (ms p50 / p99)", ms(shared)))
        heard, acked = feed_latency(pg.new_database(), vm, args.rounds)
        rows.append(("publish start -> writer's put returns (ms p50 / p99)", ms(acked)))
        rows.append(("publish start -> another process's feed hears it (ms p50 / p99)", ms(heard)))
        rows += end_to_end(pg.new_database(), work, vm, args.rounds)
    finally:
        pg.close()
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


def end_to_end(dsn: str, work: Path, vm, rounds: int) -> list[tuple[str, str]]:
    for name in ("single", "a", "b"):
        (work / name).mkdir()
    single = start_server(work / "single", store=work / "single-store", admin_token=None)
    a = start_server(work / "a", store=dsn, admin_token=None)
    b = start_server(work / "b", store=dsn, admin_token=None)
    try:
        for server in (single, a, b):  # warm up: first forward, first upload
            upload_then_generate(server, server, "", vm, 2)
        base, cross = [], []
        for _ in range(rounds // 10):  # interleaved: the machine's noise hits both alike
            base += upload_then_generate(single, single, "", vm, 10)
            cross += upload_then_generate(a, b, "", vm, 10)
        ratio = pct(cross, 0.5) / pct(base, 0.5)
        return [
            ("upload 201 -> 1-token answer, one server, local store (ms p50 / p99)", ms(base)),
            ("upload 201 on A -> 1-token answer from B, PostgreSQL (ms p50 / p99)", ms(cross)),
            ("stale answers from B", "0 (every answer named the acknowledged version)"),
            ("cross-replica / single-server, p50", f"{ratio:.2f}x"),
        ]
    finally:
        for server in (single, a, b):
            server.stop()


if __name__ == "__main__":
    main()

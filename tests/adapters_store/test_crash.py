"""A writer process SIGKILLed at any instant leaves the old or the new version, never torn.

Both backends: the store directory, or a PostgreSQL database (where a killed client's open
transaction is rolled back by the server).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FP, KEY, LAYOUT, read_adapter

from adapters_store import AdapterStore, open_backend

WRITER = Path(__file__).with_name("crash_writer.py")
USERS = 4


def start_writer(location: str, first: int, *failpoint: str) -> subprocess.Popen:
    args = [sys.executable, str(WRITER), location, str(first), str(USERS), *failpoint]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    return proc


def kill(proc: subprocess.Popen) -> list[str]:
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return out.splitlines()


def acked(lines: list[str]) -> dict[str, int]:
    """user -> value of the last put the writer saw return."""
    last: dict[str, int] = {}
    for line in lines:
        if line.startswith("OK "):
            _, user, k, _ = line.split()
            last[user] = int(k)
    return last


def check_consistent(location: str, last_acked: dict[str, int], max_started: int) -> dict[str, int]:
    """Reopen (recovery), then every user's adapter is whole and one of its written versions,
    no older than its last acknowledged put. Returns user -> stored value."""
    with AdapterStore(open_backend(location, retain_s=0.0), LAYOUT, KEY, FP) as store:
        assert not list(Path(location).glob("adapters/*/.tmp-*"))  # local: no temp file left
        values = {}
        for meta in store.list():
            adapter, _ = read_adapter(store, meta.user_id)  # sha256-checked, parsed whole
            flat = store.load_flat(meta.user_id)
            assert torch.equal(flat, adapter.flat(LAYOUT))
            value = int(flat[0].item())
            assert torch.equal(flat, torch.full_like(flat, float(value))), "torn/mixed file"
            assert f"u{value % USERS}" == meta.user_id and value <= max_started
            assert value >= last_acked.get(meta.user_id, 0), "an acknowledged put was lost"
            values[meta.user_id] = value
        assert set(last_acked) <= set(values)
    return values


# (backend, failpoint, whether the interrupted put's version is current after recovery)
STEPS = [
    ("local", "tmp_written", False),
    ("local", "tmp_synced", False),
    ("local", "renamed", True),  # the complete file is adopted: this process is its only writer
    ("local", "committed", True),
    ("postgres", "reserved", False),  # a version that never became visible
    ("postgres", "blob_written", False),  # blob stored, index commit never sent: not adopted
    ("postgres", "committed", True),
]


@pytest.mark.parametrize("backend_kind, point, new_wins", STEPS)
def test_kill_at_each_write_step(location: str, point: str, new_wins: bool) -> None:
    proc = start_writer(location, 1, point, "6")  # puts 1..5 complete, put 6 stops at ``point``
    lines = []
    while not (lines and lines[-1].startswith("AT ")):
        lines.append(proc.stdout.readline().strip())
    lines += kill(proc)
    assert lines[-1] == f"AT {point}" and len(acked(lines)) == USERS
    values = check_consistent(location, acked(lines), max_started=6)
    assert values["u2"] == (6 if new_wins else 2)  # put 6 went to user u2 (6 % 4)


@pytest.mark.slow
def test_kill_after_random_delays_then_resume(location: str) -> None:
    rng, first, total_puts = random.Random(1234), 1, 0
    last_acked: dict[str, int] = {}
    for _ in range(4):
        proc = start_writer(location, first)
        time.sleep(rng.uniform(0.05, 0.6))
        lines = kill(proc)
        last_acked.update(acked(lines))
        max_started = first + len(lines)  # the put after the last OK may have landed
        check_consistent(location, last_acked, max_started)
        total_puts += len(lines)
        first = max_started + 1
    assert total_puts > 20, f"the writer completed only {total_puts} puts"

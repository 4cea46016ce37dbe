"""The engine thread alone runs torch on every core; the main thread and later threads on one."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = """
import threading, torch
from server.engine import cpu_threads
torch.set_num_threads(3)
claimable = cpu_threads.reserve_for_engine()
seen = {"main": torch.get_num_threads(), "claimable": claimable}
def engine():
    seen["claimed"] = cpu_threads.claim(2)
    seen["engine"] = torch.get_num_threads()
    torch.nn.functional.linear(torch.randn(64, 576), torch.randn(1536, 576))  # MKL, 2 threads
def other(name):
    seen[name] = torch.get_num_threads()
for target, args in ((other, ("before",)), (engine, ()), (other, ("after",))):
    t = threading.Thread(target=target, args=args)
    t.start()
    t.join()
seen["main after"] = torch.get_num_threads()
print(seen)
"""


@pytest.mark.skipif(
    not any((Path(torch.__file__).parent / "lib").glob("libgomp*")),
    reason="this torch build runs no bundled libgomp to set threads through",
)
def test_engine_thread_claims_threads_for_itself_alone() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=120
    )
    seen = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert seen == {
        "main": 1,
        "claimable": 3,
        "before": 1,
        "claimed": True,
        "engine": 2,
        "after": 1,  # the claim is the engine thread's own, not torch's process-wide setting
        "main after": 1,
    }, seen

"""Subprocess for the SIGKILL tests: put adapters in a loop until killed.

usage: crash_writer.py LOCATION FIRST_SEQ USERS [FAILPOINT PUT_NUMBER]

LOCATION is a store directory or a ``postgresql://`` DSN.

Put number k (from FIRST_SEQ) writes user ``u{k % USERS}`` with every value equal to k and
prints ``OK <user> <k> <version>`` once put returned. With a failpoint, the PUT_NUMBER-th put
prints ``AT <failpoint>`` when it reaches that step and then hangs, waiting for SIGKILL.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

# the checkout this file is in, before any installed copy of the packages; then helpers
sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parents[2])]

from helpers import FP, KEY, LAYOUT, filled_adapter  # noqa: E402

import adapters_store.backend  # noqa: E402
import adapters_store.file_blobs  # noqa: E402
from adapters_store import AdapterStore, open_backend  # noqa: E402


def main() -> None:
    root, first, users = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    target, stop_at = (sys.argv[4], int(sys.argv[5])) if len(sys.argv) > 5 else (None, -1)
    store = AdapterStore(open_backend(root, retain_s=0.0), LAYOUT, KEY, FP)
    current = {"put": 0}

    def failpoint(name: str) -> None:
        if name == target and current["put"] == stop_at:
            print(f"AT {name}", flush=True)
            time.sleep(3600)

    adapters_store.backend.failpoint = failpoint
    adapters_store.file_blobs.failpoint = failpoint
    print("READY", flush=True)
    for k in itertools.count(first):
        current["put"] = k - first + 1
        user = f"u{k % users}"
        meta = store.put(user, filled_adapter(float(k)))
        print(f"OK {user} {k} {meta.version}", flush=True)


if __name__ == "__main__":
    main()

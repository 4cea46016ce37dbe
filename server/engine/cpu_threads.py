"""On a CPU the engine thread owns the process's OpenMP workers; other threads run torch alone.

libgomp gives every thread that starts a parallel region a pool of workers of its own. Once a
second thread has one (the main thread loading the model, a loader copying an adapter), the
process has more OpenMP threads than cores, libgomp then spins only ~100 times before a
waiting worker sleeps, and every parallel region of the engine pays a wake-up. Measured on the
2-core AVX2 EPYC with the main thread holding a pool: a [64, 1536] multiply 75-97 us in the
engine's thread against 8-10 us, a 16-row x·Aᵀ 156-205 us against 52-76 us; the engine 108 /
164 tok/s (base rows, batch 16 / 64) against 125 / 187 when the main thread had never run two
threads (fp32, best of 3, one run).

So a server makes its main thread single-threaded before its first torch op
(``reserve_for_engine``), which also makes one thread the default of every thread started
later, and the engine thread takes the cores back for itself alone (``claim``), through the
thread-local settings of OpenMP and MKL, not torch's process-wide one.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def reserve_for_engine() -> int:
    """In the main thread, before it runs a torch op: one torch thread here and by default in
    every thread started later; returns the threads the engine should claim (torch's
    default, the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.ones(1 << 17).add_(1)  # settles this thread's lazy thread setup at one thread
    return threads


def claim(threads: int) -> bool:
    """In the engine thread: run its torch ops on ``threads`` OpenMP and MKL threads, for this
    thread only. False (and torch's process-wide setting left alone) where this torch build
    has no libgomp or MKL to set them through."""
    torch.ones(1 << 17).add_(1)  # torch's lazy per-thread setup first: it applies the default
    lib = Path(torch.__file__).parent / "lib"
    try:
        gomp = ctypes.CDLL(str(next(lib.glob("libgomp*.so*"))))
        torch_cpu = ctypes.CDLL(str(lib / "libtorch_cpu.so"))
        gomp.omp_set_num_threads(ctypes.c_int(threads))
        # the exported symbol is MKL's Fortran entry point: the count by reference
        torch_cpu.mkl_set_num_threads_local(ctypes.byref(ctypes.c_int(threads)))
    except (StopIteration, OSError, AttributeError) as e:
        log.info("engine threads: no thread-local OpenMP/MKL setting (%s)", e)
        return False
    return torch.get_num_threads() == threads

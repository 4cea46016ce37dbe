"""``torch.compile`` of the decode forward (``--compile auto|background|on|off``, decided by
``ServerConfig.compile_mode``).

Only the one-token decode forward is compiled (prefill and mixed steps stay eager: their shapes
vary with every prompt). ``dynamic=True`` so that one graph serves every batch size and KV
length; the adapter path (slots set) and the base path (all rows slot 0) are two graphs.

Two ways to get there:

* ``background`` (CPU): the server answers with the eager step at once; once its first
  request has finished (or after ``COMPILE_DELAY_S`` without one: compiling holds the GIL
  for long stretches, which would slow the first answers) a thread compiles and warms the
  decode step on its own scratch KV cache (the model's forward slot is per
  thread, ``vera_core/forward.py``), then the engine switches to it between two steps. After
  the switch a decode whose shape was not warmed runs eager for that step instead of
  recompiling on the engine thread (``DecodeCompiler.__call__``). Inductor's caches live under
  ``$VERA_HOME/compile-cache`` (``use_compile_cache``): a restart finds its kernels there
  (measured on 2 CPU cores: the first shape compiled 103 s after the start with the cache
  warm, 278 s with it empty; dynamo's tracing is not cached).
* ``startup`` (CUDA): compiled and warmed before the server listens, with CUDA graphs
  (``mode="reduce-overhead"``): the decode step runs in static shapes
  (``EngineConfig.static_decode``, ``server/engine/shapes.py``): the batch padded to a row
  bucket, attention over a length bucket of KV columns, a KV cache allocated once at full
  size, and the KV buffers, the adapter bank and the shared A/B marked as static addresses
  (replays read them in place; uploads write the bank in place). Each bucket pair is recorded
  as a graph when first used (every row bucket at the first length bucket during warm-up).

Measured by ``bench/bench_compile.py`` (SmolLM2-135M, decode step through this engine's path,
same run, interleaved): on an AVX512-BF16 CPU in bf16, batch 16, 1 thread, compiled base 1.48x
and mixed users 1.27x of eager; fp32 0.87x and 0.94x. bf16 logits of the compiled step are not
those of the eager model (greedy tokens part at near-ties); fp32 tokens are exact
(``tests/server/test_engine.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

log = logging.getLogger(__name__)
COMPILE_NICE = 10  # the background compile thread's niceness (0 = as the serving threads)
COMPILE_DELAY_S = 10.0  # start the background compile by then if no request has finished


def compile_decode(model: torch.nn.Module, cuda_graphs: bool = False) -> Callable[..., object]:
    """The model's forward compiled with inductor, shapes dynamic (batch, KV length); with
    ``cuda_graphs``, each distinct (bucketed) shape is also recorded as a CUDA graph and
    replayed (``mode="reduce-overhead"``)."""
    if cuda_graphs:
        return torch.compile(model, mode="reduce-overhead", dynamic=True)
    return torch.compile(model, dynamic=True)


def use_compile_cache(directory: Path) -> None:
    """Keep inductor's kernel and graph caches (and AOTAutograd's) in ``directory`` for good
    (a restart compiles from them), unless TORCHINDUCTOR_CACHE_DIR names another directory
    than inductor's default. Call it before anything compiles: the compile workers inherit the
    variable when they start."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # inductor writes its default into the environment on first use (an import may do it):
    # only another value is a user's choice
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)


class DecodeCompiler:
    """The compiled decode step, made and warmed on a background thread while the engine
    decodes eagerly, one decode shape after another (``signature``: batch of one or more,
    adapter rows or base rows, compact KV rows or not).

    ``warm(step, done)`` is called on the background thread with the compiled step; it runs
    one decode forward per shape to warm, on its own KV cache (the model's forward slot is per
    thread), and calls ``done(signature)`` after each. The engine calls the compiler like the
    model, with the step's signature: compiled once that shape is warm, eager before. Once
    every shape is warm (``ready``) a decode whose guards the warm-up did not meet runs eager
    for that step rather than recompiling on the engine thread (stance
    ``eager_on_recompile``; global in torch, so only set once the compile thread is done)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.compiled = compile_decode(model)
        self.state = "warming"  # -> "ready" | "failed"
        self.seconds: float | None = None  # compile + warm-up time, once ready
        self.first_seconds: float | None = None  # until the first shape was warm
        self.error: str | None = None
        self.warm: frozenset[Any] = frozenset()  # signatures that run compiled
        self.compiled_steps = 0  # decode forwards through the compiled step
        self.eager_steps = 0  # decode forwards of a shape not (yet) compiled
        self._t0 = time.perf_counter()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    def start(self, warm: Callable[[Callable[..., Any], Callable[[Any], None]], None]) -> None:
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(
            target=self._run, args=(warm,), name="vera-compile", daemon=True
        )
        self._thread.start()
        self._started.set()

    @property
    def started(self) -> bool:
        return self._started.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the warm-up to start and end; True if the compiled step is ready."""
        t0 = time.perf_counter()
        if self._started.wait(timeout) and self._thread is not None:
            left = None if timeout is None else max(0.0, timeout - (time.perf_counter() - t0))
            self._thread.join(left)
        return self.state == "ready"

    def _done(self, signature: Any) -> None:
        """On the compile thread: ``signature`` ran compiled; the engine may use it now."""
        if self.first_seconds is None:
            self.first_seconds = time.perf_counter() - self._t0
        self.warm = self.warm | {signature}  # a new set: the engine thread reads it unlocked
        log.info(
            "decode step compiled for %s after %.1f s", signature, time.perf_counter() - self._t0
        )

    def _run(self, warm: Callable[[Callable[..., Any], Callable[[Any], None]], None]) -> None:
        # below the serving threads: compiling takes what CPU they leave (its compiler
        # subprocesses inherit the priority); Linux sets it per thread
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), COMPILE_NICE)
        try:
            with torch.no_grad():
                warm(self.compiled, self._done)
        except Exception as e:  # the eager step keeps serving (and the shapes already warm)
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            log.exception("compiling the decode step failed; the remaining shapes stay eager")
            return
        self.seconds = time.perf_counter() - self._t0
        self.state = "ready"  # read by the engine thread at its next decode
        log.info("decode step compiled and warm for every shape after %.1f s", self.seconds)

    def __call__(self, signature: Any, **inputs: Any) -> Any:
        """One decode forward of shape ``signature``: compiled if warm, else the eager model."""
        if signature not in self.warm:
            self.eager_steps += 1
            return self.model(**inputs)
        self.compiled_steps += 1
        if self.state != "ready":  # still compiling other shapes: the stance would stop it
            return self.compiled(**inputs)
        with torch.compiler.set_stance("eager_on_recompile"):
            return self.compiled(**inputs)

    def stats(self) -> dict[str, Any]:
        def s(v: float | None) -> float | None:
            return None if v is None else round(v, 1)

        return {
            "state": self.state,
            "seconds": s(self.seconds),
            "first_shape_seconds": s(self.first_seconds),
            "warm_shapes": len(self.warm),
            "error": self.error,
            "compiled_steps": self.compiled_steps,
            "eager_steps": self.eager_steps,
        }

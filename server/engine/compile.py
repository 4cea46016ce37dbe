"""Optional ``torch.compile`` of the decode forward (``--compile auto|on|off``, decided by
``ServerConfig.compile_decode``).

Only the one-token decode forward is compiled (prefill stays eager: its shapes vary with every
prompt). ``dynamic=True`` so that one graph serves every batch size and KV length; the adapter
path (slots set) and the base path (all rows slot 0) are two graphs, both warmed at startup.

What ``auto`` means, measured by ``bench/bench_compile.py`` (SmolLM2-135M, decode step through
this engine's path, same run, interleaved):

* CPU: off. Inductor made the step faster (bf16 batch 16, 1 torch thread: base 1.48x, mixed
  users 1.27x; fp32 not faster: 0.87x and 0.94x of eager, logits within 7e-5), but compiling
  took minutes at startup on 2 cores, bf16 logits are not those of the eager model (greedy
  tokens part at near-ties), and a path not warmed at startup (a new
  guard: e.g. non-compact KV rows) recompiles on the engine thread while requests wait.
* CUDA: on, with CUDA graphs (``mode="reduce-overhead"``): the decode step runs in static
  shapes (``EngineConfig.static_decode``, ``server/engine/shapes.py``): the batch padded to a
  row bucket, attention over a length bucket of KV columns, a KV cache allocated once at full
  size, and the KV buffers, the adapter bank and the shared A/B marked as static addresses
  (replays read them in place; uploads write the bank in place). Inductor compiles once
  (dynamic shapes); each bucket pair is recorded as a graph when first used (every row bucket
  at the first length bucket during warm-up). The token-exact test of this path
  (``tests/server/test_engine.py``, ``VERA_TEST_COMPILE=1``) runs on CPU in eager and with
  inductor; on CUDA in ``bench/gpu_check.sh``. Not yet measured on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def compile_decode(model: torch.nn.Module, cuda_graphs: bool = False) -> Callable[..., object]:
    """The model's forward compiled with inductor, shapes dynamic (batch, KV length); with
    ``cuda_graphs``, each distinct (bucketed) shape is also recorded as a CUDA graph and
    replayed (``mode="reduce-overhead"``)."""
    if cuda_graphs:
        return torch.compile(model, mode="reduce-overhead", dynamic=True)
    return torch.compile(model, dynamic=True)

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
* CUDA: on, with inductor's default mode. Not measured here (no GPU). CUDA graphs
  (``mode="reduce-overhead"``) need static shapes, and the KV length of a decode step still
  grows by one each step, so they are not used yet.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def compile_decode(model: torch.nn.Module) -> Callable[..., object]:
    """The model's forward compiled with inductor, shapes dynamic (batch, KV length)."""
    return torch.compile(model, dynamic=True)

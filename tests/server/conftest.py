"""Fixtures: live servers on the real default model, and a reference copy of that model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from live import LiveServer, start_server

from server.model_source import load_model
from vera_core import Adapter, VeraConfig, VeraModel, inject_vera
from vera_core.merge import merge, unmerge


@pytest.fixture(scope="session")
def ref_vm() -> VeraModel:
    """The default model in the test process, to compute reference tokens."""
    model, tok, _ = load_model()
    vm = inject_vera(model, VeraConfig(r=256), num_slots=2)
    vm.tokenizer = tok  # type: ignore[attr-defined]
    return vm


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The main server: auth on (admin token), default limits, real default model."""
    server = start_server(
        tmp_path_factory.mktemp("live"), "--device-slots", "24", "--max-batch", "32"
    )
    yield server
    server.stop()


def merged_greedy(
    vm: VeraModel, adapter: Adapter | None, prompt_ids: list[int], max_new_tokens: int
) -> list[int]:
    """transformers ``generate`` (greedy) with ``adapter`` merged into the weights."""
    if adapter is not None:
        merge(vm, adapter)
    try:
        with torch.no_grad():
            out = vm.model.generate(
                torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False
            )
    finally:
        unmerge(vm)
    new = out[0, len(prompt_ids) :].tolist()
    eos = vm.model.generation_config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    return new[:-1] if new and new[-1] in eos_ids else new

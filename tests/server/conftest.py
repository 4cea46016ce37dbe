"""Fixtures: live servers on the real default model (and a busy one on a tiny model), and a
reference copy of the default model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from busy_server import BusyServer, start_busy
from live import LiveServer, start_server

from server.model_source import load_model
from vera_core import VeraConfig, VeraModel, inject_vera


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


@pytest.fixture(scope="session")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BusyServer]:
    """A tiny-model server (admin token on) whose users alice, bruno and chen have adapters
    and have been served, and whose one fine-tuning job (bruno's) has succeeded."""
    server = start_busy(tmp_path_factory.mktemp("busy"))
    yield server
    server.live.stop()

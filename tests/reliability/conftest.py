"""Fixtures: one tiny random Llama directory per session, its VeraModel, and servers on it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))

from kit import build_tiny_model, start_tiny, tiny_vm  # noqa: E402
from live import LiveServer  # noqa: E402

from vera_core import VeraModel  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tvm(tiny_dir: Path) -> VeraModel:
    return tiny_vm(tiny_dir)


@pytest.fixture(scope="session")
def tiny_auth(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[LiveServer]:
    """Tiny-model server with auth on (admin token), shared by the upload and isolation tests."""
    server = start_tiny(tmp_path_factory.mktemp("tiny-auth"), tiny_dir, "--max-body-mb", "1")
    yield server
    server.stop()

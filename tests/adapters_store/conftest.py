"""Store fixtures, parametrized over both backends: ``backend_kind`` is "local" or "postgres".

A test (or module) that inspects files on disk narrows it with ``helpers.LOCAL_ONLY``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import FP, KEY, LAYOUT  # noqa: E402

from adapters_store import (  # noqa: E402
    DEFAULT_RETAIN_S,
    AdapterBackend,
    AdapterStore,
    open_backend,
)

BackendFactory = Callable[..., AdapterBackend]


@pytest.fixture(params=["local", "postgres"])
def backend_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def location(backend_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """Where this test's store lives: a fresh directory, or a fresh database's DSN."""
    if backend_kind == "postgres":
        return request.getfixturevalue("postgres").new_database()
    return str(tmp_path / "store")


@pytest.fixture
def make_backend(location: str) -> Iterator[BackendFactory]:
    """make_backend(retain_s=...) -> a new backend on this test's location; closed at teardown."""
    opened: list[AdapterBackend] = []

    def _make(retain_s: float = DEFAULT_RETAIN_S) -> AdapterBackend:
        opened.append(open_backend(location, retain_s))
        return opened[-1]

    yield _make
    for backend in opened:
        backend.close()


@pytest.fixture
def open_store(make_backend: BackendFactory) -> Callable[..., AdapterStore]:
    """open_store(retain_s=..., verify_on_open=...) -> AdapterStore on this test's location."""

    def _open(retain_s: float = DEFAULT_RETAIN_S, **kwargs) -> AdapterStore:
        return AdapterStore(make_backend(retain_s), LAYOUT, KEY, FP, **kwargs)

    return _open


@pytest.fixture
def store(open_store) -> AdapterStore:
    return open_store()

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import FP, KEY, LAYOUT  # noqa: E402

from adapters_store import AdapterStore  # noqa: E402


@pytest.fixture
def open_store(tmp_path: Path) -> Iterator:
    """open_store(**kwargs) -> AdapterStore on tmp_path/store; all closed at teardown."""
    opened: list[AdapterStore] = []

    def _open(**kwargs) -> AdapterStore:
        store = AdapterStore(tmp_path / "store", LAYOUT, KEY, FP, **kwargs)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store) -> AdapterStore:
    return open_store()

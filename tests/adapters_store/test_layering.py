"""adapters_store depends on vera_core only: never on server/ (dependencies point one way)."""

from __future__ import annotations

import ast
from pathlib import Path

import adapters_store

ALLOWED_FIRST_PARTY = {"adapters_store", "vera_core"}
FIRST_PARTY = {"adapters_store", "vera_core", "server"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_imports_of_server() -> None:
    package = Path(adapters_store.__file__).parent
    for path in sorted(package.glob("*.py")):
        bad = (imported_roots(path) & FIRST_PARTY) - ALLOWED_FIRST_PARTY
        assert not bad, f"{path.name} imports {bad}"

"""Dependencies point one way: server -> adapters_store -> vera_core, and inside server the
engine sits below the rooms that use it (read from every module's imports, statically)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# module prefix -> first-party module prefixes it must never import
FORBIDDEN = {
    "vera_core": ("adapters_store", "server"),
    "adapters_store": ("server",),
    "server.engine": (
        "server.api",
        "server.auth",
        "server.cluster",
        "server.finetune",
        "server.runtime",
        "server.storage",
        "server.tenants",
    ),
    "server.auth": ("server.api", "server.cluster", "server.runtime"),
    "server.finetune": ("server.api", "server.cluster", "server.runtime"),
    "server.tenants": ("server.api", "server.cluster", "server.runtime"),
    "server.storage": ("server.api", "server.cluster", "server.runtime"),
}


def modules() -> list[tuple[str, Path]]:
    out = []
    for package in ("vera_core", "adapters_store", "server"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out.append((".".join(parts).removesuffix(".__init__"), path))
    return out


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize(("module", "path"), modules(), ids=lambda x: str(x))
def test_dependencies_point_one_way(module: str, path: Path) -> None:
    for owner, forbidden in FORBIDDEN.items():
        if module == owner or module.startswith(owner + "."):
            bad = {m for m in imports(path) for f in forbidden if m == f or m.startswith(f + ".")}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_every_package_module_is_checked() -> None:
    assert len(modules()) > 80

"""The README's configuration tables list every flag with its real default."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from server.cluster.config import ClusterConfig
from server.config import ServerConfig

README = (Path(__file__).parents[2] / "README.md").read_text()


@pytest.mark.parametrize("config", [ServerConfig, ClusterConfig])
def test_every_flag_is_documented_with_its_default(config) -> None:
    for f in fields(config):
        if f.name == "admin_token":  # env only, documented in prose
            continue
        default = "(empty)" if f.default == "" else f.default
        row = f"| `--{f.name.replace('_', '-')}` | `{default}` |"
        assert row in README, f"README configuration table: missing or stale row {row}"

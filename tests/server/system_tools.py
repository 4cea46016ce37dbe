"""Programs some tests drive that are not Python packages (Chromium, Prometheus): where they are,
or the test is skipped; on CI (``CI`` set) a missing program fails the test instead, as the
PostgreSQL fixture does. ``make install`` installs them with apt-get when run as root."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def system_tool(name: str, package: str) -> Path:
    """The executable ``name`` (on PATH or in /usr/bin); else skip, or fail on CI."""
    found = shutil.which(name) or f"/usr/bin/{name}"
    if not Path(found).exists():
        reason = f"{name} not found; apt-get install {package}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return Path(found)

"""What the slot-pool tests share: a local store of tiny adapters, and waiting for a load."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "adapters_store"))

from helpers import FP, KEY, LAYOUT, filled_adapter  # noqa: E402

from server.engine import SlotTicket  # noqa: E402

__all__ = ["FP", "KEY", "LAYOUT", "filled_adapter", "wait_host"]


def wait_host(ticket: SlotTicket, timeout: float) -> bool:
    """Block until the ticket's adapter is in host memory (True), or its load failed or
    timed out (False). A ticket made while its adapter sat on a device slot has no load."""
    if ticket.host is None:
        return True
    ticket.host.done.wait(timeout)
    return ticket.host.flat is not None

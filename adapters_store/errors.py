"""Typed store errors: each names what went wrong so the server can map it to a status code.

``StoreError`` derives from ``VeraError`` so one ``except VeraError`` covers the whole stack.
"""

from __future__ import annotations

from vera_core.errors import VeraError


class StoreError(VeraError):
    """Base class of every error raised by adapters_store."""


class InvalidUserId(StoreError, ValueError):
    """A user id that is not ``[A-Za-z0-9._-]{1,128}`` (it is never used as a path then)."""


class AdapterNotFound(StoreError, KeyError):
    """No adapter (or no such version) is stored for this user."""

    def __str__(self) -> str:  # KeyError's default str() would wrap the message in quotes
        return str(self.args[0]) if self.args else "adapter not found"


class StoreCorruptError(StoreError):
    """Stored bytes no longer match their recorded checksum (disk damage, manual edits)."""


class StoreUnavailable(StoreError):
    """The store's database cannot be reached now; raised within a few seconds,
    never after a long hang. Transient: the same call may succeed once the database is back."""

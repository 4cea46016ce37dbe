"""Typed errors: each says what differs, so the server can answer 4xx with that message."""

from __future__ import annotations


class VeraError(Exception):
    """Base class of every error raised by vera_core."""


class TargetModuleError(VeraError):
    """Requested target modules do not exist in the model, or are not linear layers."""


class AdapterFormatError(VeraError):
    """An adapter file is unreadable: truncated, garbage, missing keys, bad metadata."""


class AdapterValueError(VeraError):
    """An adapter's numbers are unusable: NaN/Inf, absurd magnitudes, wrong dtype."""


class AdapterMismatchError(VeraError):
    """A well-formed adapter that does not fit this server: r, key, targets, shapes, base model."""

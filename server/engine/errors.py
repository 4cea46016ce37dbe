"""Errors the engine raises to callers of ``submit``, or ends a sequence with."""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's errors."""


class QueueFull(EngineError):
    """The waiting queue is at its bound: try again later (HTTP 429)."""


class ContextTooLong(EngineError):
    """The prompt plus ``max_new_tokens`` does not fit the context (or the prompt is empty)."""


class InvalidTokens(EngineError):
    """A token id (of the prompt, ``logit_bias`` or ``stop_token_ids``) is not in the vocab."""


class InvalidGrammar(EngineError, ValueError):
    """A request's grammar (its JSON schema) cannot be compiled (HTTP 400)."""


class EngineStopped(EngineError):
    """The engine is shutting down and takes no more work."""


class SlotsExhausted(EngineError, TimeoutError):
    """Every device slot stayed pinned by in-flight requests for longer than the timeout."""


class AdapterLoadTimeout(EngineError, TimeoutError):
    """An adapter did not reach host memory within the acquire timeout (slow or stuck disk)."""

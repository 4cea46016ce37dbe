"""Incremental detokenization with stop strings: what text a sequence may emit so far."""

from __future__ import annotations

from typing import Any


class StopChecker:
    """Tracks decoded text; holds back a tail that could still become a stop string."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.text = ""  # decoded output so far (cut at a stop string)
        self.sent = 0  # characters of ``text`` already emitted
        self.stopped = False
        self._decoded = ""  # everything decoded so far, uncut
        self._prefix = 0  # token offsets of the decode window (O(1) work per token)
        self._read = 0

    def update(self, output_ids: list[int]) -> str:
        """Decode the newest token(s); return the new text that is safe to emit."""
        self._decoded += self._next_piece(output_ids)
        text = self._decoded
        cut = None
        for s in self.stop:
            idx = text.find(s, max(0, self.sent - len(s)))
            if idx != -1 and (cut is None or idx < cut):
                cut = idx
        if cut is not None:
            text, self.stopped = text[:cut], True
        self.text = text
        safe = len(text) if self.stopped else len(text) - self._held_tail()
        safe = max(safe, self.sent)
        delta = text[self.sent : safe]
        self.sent = safe
        return delta

    def _next_piece(self, ids: list[int]) -> str:
        """Text added by ids[read:], decoded with a few tokens of context so that spacing and
        multi-byte characters come out as a full decode would give them."""
        decode = self.tokenizer.decode
        before = decode(ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(ids[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self._prefix, self._read = self._read, len(ids)
        return after[len(before) :]

    def flush(self) -> str:
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta

    def _held_tail(self) -> int:
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold

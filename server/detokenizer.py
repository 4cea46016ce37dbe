"""Incremental detokenization with stop strings: what text a sequence may emit so far."""

from __future__ import annotations

from typing import Any


class StopChecker:
    """Tracks decoded text; holds back a tail that could still become a stop string."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def update(self, output_ids: list[int]) -> str:
        """Re-decode ``output_ids``; return the new text that is safe to emit."""
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more tokens
            text = text[:-1]
        self.text = text
        for s in self.stop:
            idx = text.find(s, max(0, self.sent - len(s)))
            if idx != -1:
                self.text = text[:idx]
                self.stopped = True
        safe = len(self.text) if self.stopped else len(self.text) - self._held_tail()
        safe = max(safe, self.sent)
        delta = self.text[self.sent : safe]
        self.sent = safe
        return delta

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

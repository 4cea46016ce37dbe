"""One choice of an OpenAI answer as it streams: its text, and its tokens' logprobs in the
endpoint's shape (``logprob_shapes``). A request has one per prompt and per ``n``."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from server.api import logprob_shapes
from server.engine import Event
from server.engine.sampler import TokenLogprobs


class CompletionChoice:
    """A streamed /v1/completions choice: the echoed prompt first (``echo``: its text, and its
    tokens' logprobs once they come), then each token's text and logprobs; ``text_offset``
    counts from the start of the streamed text."""

    def __init__(
        self,
        index: int,
        tok: PreTrainedTokenizerBase,
        prompt_ids: list[int],
        echo: str | None,
        logprobs: int | None,
    ) -> None:
        self.index, self.tok, self.prompt_ids = index, tok, prompt_ids
        self.echo, self.logprobs = echo, logprobs
        self.offset = 0  # characters streamed so far

    def _prompt(self, ev: Event) -> tuple[str, dict | None]:
        """The echoed prompt, once (with its logprobs when they came with ``ev``)."""
        if self.echo is None:
            return "", None
        text, self.echo = self.echo, None
        shape = None
        if self.logprobs is not None and ev.prompt_logprobs is not None:
            shape = logprob_shapes.legacy(self.tok, self.prompt_ids, ev.prompt_logprobs)
        self.offset = len(text)
        return text, shape

    def token(self, ev: Event) -> dict[str, Any] | None:
        text, shape = self._prompt(ev)
        if self.logprobs is not None and ev.logprobs is not None:
            one = logprob_shapes.legacy(self.tok, [ev.logprobs.token], [ev.logprobs])
            one["text_offset"] = [self.offset]
            shape = one if shape is None else {k: shape[k] + one[k] for k in shape}
        self.offset += len(ev.text)
        text += ev.text
        if not text and shape is None:
            return None  # a token that completes no character yet
        return {"index": self.index, "text": text, "logprobs": shape, "finish_reason": None}

    def final(self, ev: Event, finish: str) -> dict[str, Any]:
        text, shape = self._prompt(ev)
        return {"index": self.index, "text": text, "logprobs": shape, "finish_reason": finish}


class ChatChoice:
    """A streamed /v1/chat/completions choice: ``role`` on its first delta; a token whose text
    is not complete yet waits, its logprobs sent with the next delta that has text.
    ``held``: the output may be tool calls, so the text is held and the final delta carries
    the whole message (its content or its ``tool_calls``)."""

    def __init__(
        self, index: int, tok: PreTrainedTokenizerBase, logprobs: bool, held: bool = False
    ) -> None:
        self.index, self.tok, self.logprobs = index, tok, logprobs
        self.first = True
        self.pending: list[TokenLogprobs] = []
        self.holding = held
        self.held = ""  # the text so far, while holding

    def content(self, lps: list[TokenLogprobs]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {"content": logprob_shapes.chat_content(self.tok, lps), "refusal": None}

    def _choice(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        choice = {"index": self.index, "delta": delta, "finish_reason": finish}
        if self.logprobs:
            choice["logprobs"] = self.content(self.pending)
        self.pending = []
        return choice

    def token(self, ev: Event) -> dict[str, Any] | None:
        if ev.logprobs is not None:
            self.pending.append(ev.logprobs)
        if self.holding:
            self.held += ev.text
            return None
        if not ev.text:
            return None  # a token that completes no character yet
        delta = {"content": ev.text}
        if self.first:
            delta["role"], self.first = "assistant", False
        return self._choice(delta, None)

    def final(self, finish: str, message: dict[str, Any] | None = None) -> dict[str, Any]:
        """The last delta: ``message`` (held output, read) or nothing more."""
        if message is not None:
            delta = dict(message)
            if delta.get("tool_calls"):
                calls = enumerate(message["tool_calls"])
                delta["tool_calls"] = [{"index": i, **c} for i, c in calls]
            return self._choice(delta, finish)
        delta = {"role": "assistant", "content": ""} if self.first else {}
        return self._choice(delta, finish)

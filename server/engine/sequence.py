"""One generation request as the engine tracks it, and the events it sends back."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from server.engine.adapter_slots import SlotTicket
from server.engine.detokenizer import StopChecker
from server.engine.sampler import TokenLogprobs
from server.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from server.engine.prefix_cache import CachedPrefix


class Status(enum.Enum):
    WAITING = "waiting"  # queued; its adapter may still be loading
    RUNNING = "running"  # owns a KV row and an adapter slot
    FINISHED = "finished"


@dataclass
class Event:
    """What the engine reports: a token (``text`` delta) or the end (``finish_reason`` set)."""

    text: str = ""
    token_id: int | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    usage: dict[str, int] | None = None
    timing: dict[str, float] | None = None
    logprobs: TokenLogprobs | None = None  # of ``token_id``, when the request asked
    # the prompt's, once (on the sequence's first event after its prompt is scored); the
    # first prompt token has none
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class Channel:
    """Engine thread -> consumer. Works for asyncio handlers and for plain threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._aq: asyncio.Queue[Event] | None = asyncio.Queue() if loop is not None else None
        self._q: queue.SimpleQueue[Event] = queue.SimpleQueue()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def put_local(self, event: Event) -> None:
        """On the consumer's loop thread: hand ``event`` over (``Outbox`` calls this)."""
        if self._aq is not None:
            self._aq.put_nowait(event)
        else:
            self._q.put(event)

    async def get(self) -> Event:
        assert self._aq is not None
        return await self._aq.get()

    def get_sync(self, timeout: float | None = None) -> Event:
        return self._q.get(timeout=timeout)


class Outbox:
    """The events of one engine step, handed over when the step ends: one wake-up per
    consumer event loop per step (its handlers then run back to back), not one per token.
    Thread consumers (``loop`` None) get theirs at once."""

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Channel, Event]]] = {}

    def push(self, channel: Channel, event: Event) -> None:
        loop = channel.loop
        if loop is None:
            channel.put_local(event)
        else:
            self._by_loop.setdefault(loop, []).append((channel, event))

    def flush(self) -> None:
        batches, self._by_loop = self._by_loop, {}
        for loop, items in batches.items():
            # RuntimeError: the consumer's loop is gone, nobody is listening
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[Channel, Event]]) -> None:
    for channel, event in items:
        channel.put_local(event)


@dataclass(eq=False)
class Sequence:
    """A request from submit to its last event. Owns its output and decides when it is done
    (EOS, a stop string, max_new_tokens, the context limit); the engine only delivers."""

    request_id: str
    user_id: str | None  # None = base model
    prompt_ids: list[int]
    params: SamplingParams
    channel: Channel
    detok: StopChecker  # incremental text and stop strings of this request
    client: str = "anonymous"  # the tenant it counts against (fair share, limits, usage)
    key_id: str | None = None  # the API key it came with (usage), never the key itself
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # per output token, if asked
    # per prompt token when scoring (the first None), filled as prefill chunks run
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=lambda: [None])
    prompt_logprobs_sent: bool = False
    ticket: SlotTicket | None = None  # while an adapter is involved
    adapter_slot: int = 0  # 0 = no adapter
    adapter_version: int | None = None
    kv_row: int = -1
    num_cached: int = 0  # tokens whose K/V are in the cache
    # a live sequence of the same client and adapter whose prompt begins as this one's does,
    # or a finished one's cached K/V (``prompt_share``): this one starts from a copy of its
    # first ``shared`` positions (``scheduler``) and prefills only the rest
    parent: Sequence | CachedPrefix | None = None
    shared: int = 0
    preemptions: int = 0  # times its row was taken back for a client below its share
    engine_seconds: float = 0.0  # its share of the engine steps it took part in
    generator: torch.Generator | None = None  # seeded sampling
    matcher: Any = None  # llguidance.LLMatcher: where its output is in its grammar
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def context_ids(self) -> list[int]:
        """Every token the KV cache must hold before the next decode: the prompt, and the
        output so far when a preempted sequence is prefilled again."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def text(self) -> str:
        """Decoded output so far, cut at a stop string."""
        return self.detok.text

    def append_token(self, token: int, is_eos: bool, context_limit: int) -> tuple[str, str | None]:
        """Take one sampled token: (text now safe to emit, finish reason or None).

        EOS ends the sequence without becoming output; a stop string ends it with the text
        before the stop; otherwise ``max_new_tokens`` or the context limit ends it.
        """
        if self.params.max_new_tokens == 0:
            return "", "length"  # the prompt was only scored
        if is_eos:
            return "", "stop"
        self.output_ids.append(token)
        delta = self.detok.update(self.output_ids)
        if self.detok.stopped:
            return delta, "stop"
        if len(self.output_ids) >= self.params.max_new_tokens or self.num_tokens >= context_limit:
            return delta, "length"
        return delta, None

    def timing(self) -> dict[str, float]:
        """Total time, time to first token and decode rate of this request, in ms / tok/s."""
        end = self.finished_at or time.perf_counter()
        out = {"total_ms": round((end - self.arrival) * 1e3, 2)}
        first = self.first_token_at
        if first is not None:
            out["ttft_ms"] = round((first - self.arrival) * 1e3, 2)
            n = len(self.output_ids)
            if n > 1:
                out["decode_tokens_per_s"] = round((n - 1) / max(1e-9, end - first), 2)
        return out

    def take_prompt_logprobs(self) -> list[TokenLogprobs | None] | None:
        """The prompt's logprobs, the first time they are complete and asked for."""
        if self.params.prompt_logprobs is None or self.prompt_logprobs_sent:
            return None
        if len(self.prompt_logprobs) < len(self.prompt_ids):
            return None
        self.prompt_logprobs_sent = True
        return self.prompt_logprobs

    def flush_text(self) -> str:
        """Text held back (a possible stop-string prefix) that the end releases."""
        return self.detok.flush()

    def cancel(self) -> None:
        self.cancelled.set()

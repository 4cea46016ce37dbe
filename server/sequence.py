"""One generation request as the engine tracks it, and the events it sends back."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from adapters_store import SlotTicket


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


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


class Channel:
    """Engine thread -> consumer. Works for asyncio handlers and for plain threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._aq: asyncio.Queue[Event] | None = asyncio.Queue() if loop is not None else None
        self._q: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def push(self, event: Event) -> None:
        if self._loop is not None and self._aq is not None:
            # RuntimeError: the consumer's loop is gone, nobody is listening
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._aq.put_nowait, event)
        else:
            self._q.put(event)

    async def get(self) -> Event:
        assert self._aq is not None
        return await self._aq.get()

    def get_sync(self, timeout: float | None = None) -> Event:
        return self._q.get(timeout=timeout)


@dataclass(eq=False)
class Sequence:
    request_id: str
    user_id: str | None  # None = base model
    prompt_ids: list[int]
    params: SamplingParams
    channel: Channel
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    ticket: SlotTicket | None = None  # while an adapter is involved
    adapter_slot: int = 0  # 0 = no adapter
    adapter_version: int | None = None
    kv_row: int = -1
    num_cached: int = 0  # tokens whose K/V are in the cache
    text: str = ""  # decoded output so far (stop strings trimmed)
    sent_chars: int = 0
    generator: torch.Generator | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def cancel(self) -> None:
        self.cancelled.set()

"""The waiting queue, per client, and the order clients are admitted in.

A client is a tenant: the user whose adapter a request runs, or for base-model requests the
user of the API key (``"anonymous"`` without one). Each client has its own FIFO queue.

``fair`` (the default) is the Virtual Token Counter of "Fairness in Serving Large Language
Models" (Sheng et al., OSDI 2024): every client has a counter of the service it received,
charged ``input_weight`` per prompt token when a request is admitted and ``output_weight`` per
token it decodes, each divided by the client's weight (a tier: weight 2 is served twice as
much). Admission takes the backlogged client with the lowest counter. A client that becomes
backlogged while others are active is lifted to the lowest counter among the active clients
(backlogged or running), so time spent idle is not banked as credit. The server stays
work-conserving: a client alone gets every row. Between two backlogged clients the difference
in service stays within about one step's worth of tokens (the paper's bound: ~2x the tokens of
one step), whatever either of them sends.

``fifo`` admits by arrival time alone (kept to compare against).

Threads: the engine thread pushes, pops and charges; other threads may read sizes and take
snapshots (``queued``, ``len``, ``snapshot``), so the structure is guarded by one lock.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from server.engine.sequence import Sequence

POLICIES = ("fair", "fifo")


class TenantPolicy(Protocol):
    """What the engine asks about a client (a tenant): its weight (fair share: 2 = twice the
    service of weight 1) and how many requests it may have queued."""

    def weight(self, client: str) -> float: ...

    def max_waiting(self, client: str) -> int: ...


@dataclass(frozen=True)
class TenantDefaults:
    """Every client alike: weight 1, the same share of the queue."""

    max_waiting_per_client: int

    def weight(self, client: str) -> float:
        return 1.0

    def max_waiting(self, client: str) -> int:
        return self.max_waiting_per_client


@dataclass(frozen=True)
class FairnessConfig:
    policy: str = "fair"  # "fair" (virtual token counters) or "fifo"
    input_weight: float = 1.0  # counter charge per prompt token admitted
    output_weight: float = 2.0  # counter charge per token decoded
    preempt: bool = True  # fair: free a row of a client over its share for one waiting below it

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}")
        if self.input_weight < 0 or self.output_weight <= 0:
            raise ValueError("token weights must be >= 0 (input) and > 0 (output)")


class FairQueue:
    """Waiting sequences by client, and each client's virtual token counter."""

    def __init__(
        self, config: FairnessConfig, weight: Callable[[str], float] = lambda _: 1.0
    ) -> None:
        """``weight(client)``: the client's share (> 0; 1 by default), read when it is charged."""
        self.config = config
        self.weight = weight
        self._queues: dict[str, deque[Sequence]] = {}  # backlogged clients only
        self._size = 0
        self._lock = threading.Lock()
        self.counters: dict[str, float] = {}

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Sequence]:
        """A snapshot of every waiting sequence, client by client."""
        with self._lock:
            return iter([seq for queue in self._queues.values() for seq in queue])

    def queued(self, client: str) -> int:
        with self._lock:
            queue = self._queues.get(client)
            return len(queue) if queue is not None else 0

    def push(self, seq: Sequence, active: set[str]) -> None:
        """Queue ``seq`` at its client's tail; ``active``: clients with running sequences (a
        newly backlogged client is lifted to the lowest counter of the active ones)."""
        with self._lock:
            queue = self._queues.get(seq.client)
            if queue is None:
                self._lift(seq.client, active | set(self._queues))
                queue = self._queues[seq.client] = deque()
            queue.append(seq)
            self._size += 1

    def push_front(self, seq: Sequence) -> None:
        """A preempted sequence goes back to the head of its client's queue, unlifted."""
        with self._lock:
            self._queues.setdefault(seq.client, deque()).appendleft(seq)
            self.counters.setdefault(seq.client, 0.0)
            self._size += 1

    def order(self) -> list[str]:
        """Backlogged clients, the next to admit first."""
        with self._lock:
            heads = {client: queue[0].arrival for client, queue in self._queues.items()}
        if self.config.policy == "fifo":
            return sorted(heads, key=lambda c: heads[c])
        return sorted(heads, key=lambda c: (self.counters[c], heads[c]))

    def head(self, client: str) -> Sequence:
        return self._queues[client][0]

    def pop(self, client: str) -> Sequence:
        with self._lock:
            queue = self._queues[client]
            seq = queue.popleft()
            if not queue:
                del self._queues[client]
            self._size -= 1
            return seq

    def remove(self, seq: Sequence) -> None:
        with self._lock:
            queue = self._queues[seq.client]
            queue.remove(seq)
            if not queue:
                del self._queues[seq.client]
            self._size -= 1

    def snapshot(self) -> dict[str, tuple[float, int]]:
        """Every client seen: (its counter, sequences waiting)."""
        with self._lock:
            return {
                client: (counter, len(self._queues.get(client, ())))
                for client, counter in self.counters.items()
            }

    def charge(self, client: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        """Count service given to ``client`` (prompt tokens admitted, tokens decoded)."""
        cost = prompt_tokens * self.config.input_weight + output_tokens * self.config.output_weight
        self.counters[client] = self.counters.get(client, 0.0) + cost / self.weight(client)

    def _lift(self, client: str, active: set[str]) -> None:
        others = [self.counters[c] for c in active if c != client and c in self.counters]
        floor = min(others) if others else 0.0
        self.counters[client] = max(self.counters.get(client, 0.0), floor)

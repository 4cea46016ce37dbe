"""K/V of finished requests kept for the next prompt that begins the same way.

A per-user assistant sends its conversation again with every turn: the system prompt, the
earlier turns and the reply it just got, then the new message. When a request ends, the
positions its KV row holds (prompt and output) are copied out into a ``CachedPrefix``; a later
prompt of the same client, user and adapter version that begins with at least
``min_tokens`` of those tokens copies them back into its own row and prefills only the rest
(``prompt_share.PromptIndex`` finds it, the scheduler plans the copy as a ``Restore``, the
model runner applies it before the forward).

Sharing follows the live rule: never across clients (tenants) or adapter versions, so what one
tenant sent cannot shorten, and so reveal itself in, another's timing.

Memory is bounded by ``max_bytes``. An entry whose tokens begin another entry of the same key
is superseded by it (a conversation's earlier turn); beyond ``PER_KEY`` entries per key (the
conversations of one user that open alike, e.g. with one system prompt: a lookup compares the
new prompt with each) the least recently used goes; over the byte bound, the least recently
used entry of the client holding the most bytes goes, so one tenant's traffic cannot flush the
others' cache while it holds more than they do.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from itertools import count
from typing import Protocol

import torch

from server.engine.sequence import Sequence

PER_KEY = 64  # entries kept per key (a lookup's binary searches: ~1 ms at 2,000 tokens)


class RowReader(Protocol):
    """What the cache needs of the KV cache (``kv_cache.SlotKVCache``)."""

    def read_row(self, row: int, length: int) -> torch.Tensor | None:
        """A copy of row ``row``'s first ``length`` positions, every layer's keys and values:
        [2 * layers, kv_heads, length, head_dim]; None when nothing is allocated."""
        ...


@dataclass(eq=False)
class CachedPrefix:
    """The K/V of ``token_ids`` (the first positions of a finished request's context), as its
    client, user and adapter version computed them."""

    key: Hashable
    client: str
    token_ids: list[int]
    kv: torch.Tensor  # [2 * layers, kv_heads, len(token_ids), head_dim]
    used: int = 0  # tick of its last use (retained or restored)
    alive: bool = True  # False once evicted: a sequence linked to it prefills alone
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = self.kv.numel() * self.kv.element_size()


class PrefixCache:
    def __init__(self, max_bytes: int, min_tokens: int) -> None:
        """``max_bytes``: what every entry together may hold (0: nothing is kept).
        ``min_tokens``: a shorter context is not kept (it could never be shared)."""
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self.nbytes = 0
        self.entries = 0  # counters, not views of the dicts: read from other threads (stats)
        self._by_key: dict[Hashable, list[CachedPrefix]] = {}
        self._by_client: Counter[str] = Counter()  # bytes per client
        self._tick = count(1)
        self.retained = 0  # entries ever kept
        self.evicted = 0  # entries dropped for room (not superseded ones)
        self.hits = 0  # sequences started from an entry
        self.hit_tokens = 0  # positions restored instead of computed

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and self.min_tokens > 0

    def __len__(self) -> int:
        return self.entries

    def candidates(self, key: Hashable) -> list[CachedPrefix]:
        return self._by_key.get(key, [])

    def retain(self, seq: Sequence, key: Hashable, kv: RowReader, row: int) -> CachedPrefix | None:
        """Keep the K/V of ``seq``'s context that KV row ``row`` holds (it just ended), unless
        it is too short, too large, or already held by an entry it begins, or ``seq`` scored
        its prompt (scoring requests, e.g. an evaluation's thousands of choices, compute their
        own prompts and would only churn the cache)."""
        n = seq.num_cached
        scored = seq.params.prompt_logprobs is not None
        if not self.enabled or n < self.min_tokens or row < 0 or scored:
            return None
        tokens = seq.context_ids()[:n]
        entries = self._by_key.get(key, [])
        for entry in entries:
            if entry.token_ids[:n] == tokens:  # nothing new: an entry holds all of it
                entry.used = next(self._tick)
                return None
        data = kv.read_row(row, n)
        if data is None:
            return None
        entry = CachedPrefix(key, seq.client, tokens, data, next(self._tick))
        if entry.nbytes > self.max_bytes:
            return None
        for old in [e for e in entries if tokens[: len(e.token_ids)] == e.token_ids]:
            self._drop(old)  # superseded: the new entry begins with all of it
        entries = self._by_key.setdefault(key, [])
        if len(entries) == PER_KEY:
            self._drop(min(entries, key=lambda e: e.used))
            self.evicted += 1
        entries.append(entry)
        self.entries += 1
        self.nbytes += entry.nbytes
        self._by_client[entry.client] += entry.nbytes
        self.retained += 1
        while self.nbytes > self.max_bytes:
            self._evict_one()
        return entry

    def restored(self, entry: CachedPrefix, length: int) -> None:
        """A sequence starts from ``entry``'s first ``length`` positions."""
        entry.used = next(self._tick)
        self.hits += 1
        self.hit_tokens += length

    def clear(self) -> None:
        for entries in list(self._by_key.values()):
            for entry in list(entries):
                self._drop(entry)

    def stats(self) -> dict[str, int]:
        """Safe from any thread (plain counters)."""
        return {
            "entries": self.entries,
            "bytes": self.nbytes,
            "max_bytes": self.max_bytes,
            "retained": self.retained,
            "evicted": self.evicted,
            "hits": self.hits,
            "hit_tokens": self.hit_tokens,
        }

    def _evict_one(self) -> None:
        """The least recently used entry of the client holding the most bytes."""
        client = max(self._by_client, key=lambda c: self._by_client[c])
        owned = [e for entries in self._by_key.values() for e in entries if e.client == client]
        self._drop(min(owned, key=lambda e: e.used))
        self.evicted += 1

    def _drop(self, entry: CachedPrefix) -> None:
        entries = self._by_key[entry.key]
        entries.remove(entry)
        if not entries:
            del self._by_key[entry.key]
        entry.alive = False
        self.entries -= 1
        self.nbytes -= entry.nbytes
        self._by_client[entry.client] -= entry.nbytes
        if not self._by_client[entry.client]:
            del self._by_client[entry.client]

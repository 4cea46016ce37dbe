"""The engine's adapter memory: device slots (a VeraBank) over a host LRU cache over the store.

As a block manager is to a KV cache, ``SlotPool`` is to the adapter bank: the engine's
scheduler claims a slot for a sequence before it runs (``acquire``) and gives it back when the
sequence ends (``release``); nothing else writes the bank.

* Device: ``bank.rows`` [num_slots, num_params]; slot s > 0 holds one ``(user_id, version)``.
  A slot is refcounted by in-flight requests (``acquire``/``release``) and only a slot with
  refcount 0 is ever evicted, least recently released first.
* Host: up to ``host_capacity`` flat float32 vectors (pinned when the bank is on CUDA), LRU.
  A ticket keeps a reference to its own host copy, so evicting it from the cache never breaks
  a request that is waiting for a slot.
* Disk: ``AdapterStore.load_flat``, called only from loader threads, never the engine thread.

Consistency: ``request`` asks the store for the user's current version every time (one index
lookup), and tiers key copies by ``(user_id, version)``, so once a write is acknowledged by any
process sharing the store, the next request anywhere runs the new version (read-your-writes);
a cached copy of an older version is never served to a new request. ``invalidate`` (called
after local writes and by the store's change feed) only frees stale copies early. While the
store is unreachable (``StoreUnavailable``), a request runs the newest version this pool holds
for the user, and fails with ``StoreUnavailable`` when it holds none; the store is asked again
``OUTAGE_RECHECK_S`` after a failed lookup, so read-your-writes holds again at most that long
after the store is back.

Threads: ``request``/``invalidate``/``stats`` from any thread; ``acquire``/``release`` from the
engine thread between steps (``acquire`` is the only place the bank is written, so a copy into
a slot never races a forward pass). One lock, ``self._lock``, guards all bookkeeping; it is
never held during disk I/O or a store call (lock order: none nested, store calls outside).
Listeners added with ``on_host_ready`` are called from a loader thread whenever a load ends
(loaded or failed), so an engine waiting for one needs no polling.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters_store import AdapterNotFound, AdapterStore, StoreUnavailable
from server.engine.errors import AdapterLoadTimeout, SlotsExhausted
from server.engine.stats import Window
from vera_core.bank import NO_ADAPTER, VeraBank

Key = tuple[str, int]  # (user_id, version): what a slot or a host copy holds

OUTAGE_RECHECK_S = 1.0  # after the store failed a lookup, serve held versions this long


@dataclass(eq=False)
class HostEntry:
    """One adapter version in host memory, or on its way there (``done`` not yet set)."""

    flat: torch.Tensor | None = None  # [num_params] float32, pinned on CUDA hosts
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def nbytes(self) -> int:
        return 0 if self.flat is None else self.flat.numel() * self.flat.element_size()


@dataclass(eq=False)
class SlotTicket:
    """One request's claim on ``(user_id, version)``, made by ``SlotPool.request`` and filled
    in only by the pool: pass it to ``SlotPool.acquire``.

    The version is fixed when the ticket is made: a later re-upload does not change what
    this request runs with.
    """

    user_id: str
    version: int
    created: float  # time.monotonic() of the request, for the acquire timeout
    host: HostEntry | None = None  # the host copy this request waits for (None: on a slot)
    slot: int | None = None  # set by a successful ``acquire``

    @property
    def key(self) -> Key:
        return (self.user_id, self.version)

    @property
    def error(self) -> BaseException | None:
        """Why loading failed (e.g. AdapterNotFound, StoreCorruptError), else None."""
        return None if self.host is None else self.host.error


class SlotPool:
    """device tier over a VeraBank + host LRU cache + the store as the disk tier."""

    def __init__(
        self,
        bank: VeraBank,
        store: AdapterStore,
        host_capacity: int,
        acquire_timeout_s: float = 30.0,
        loader_threads: int = 2,
    ) -> None:
        if host_capacity < 1:
            raise ValueError("host_capacity must be >= 1")
        self.bank, self.store = bank, store
        self.host_capacity, self.acquire_timeout_s = host_capacity, acquire_timeout_s
        self._pin = bank.rows.is_cuda  # page-locked host copies only make sense for CUDA
        self._lock = threading.Lock()
        slots = range(NO_ADAPTER + 1, bank.num_slots)  # slot 0 = base model, never allocated
        self._free: list[int] = list(reversed(slots))
        self._slot_key: dict[int, Key] = {}
        self._by_key: dict[Key, int] = {}
        self._refs: dict[int, int] = dict.fromkeys(slots, 0)
        self._idle: OrderedDict[int, None] = OrderedDict()  # refcount-0 resident slots, LRU first
        self._store_down_until = 0.0  # monotonic; see _resolve
        self._stale: set[int] = set()  # pinned slots of invalidated versions: free on release
        self._host: OrderedDict[Key, HostEntry] = OrderedDict()
        self._counts = dict.fromkeys(
            ("hits", "misses", "evictions", "host_evictions", "unverified"), 0
        )
        self._latency = Window(size=4096, scale=1e3)  # seconds recorded, ms reported
        self._loader = ThreadPoolExecutor(loader_threads, thread_name_prefix="adapter-loader")
        self._listeners: list[Callable[[], None]] = []

    def on_host_ready(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (from a loader thread) each time a load ends, loaded or not."""
        self._listeners.append(listener)

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)

    def request(self, user_id: str) -> SlotTicket:
        """Resolve the user's current version and start loading it to host memory if needed.

        Non-blocking apart from one index lookup; AdapterNotFound if the user has no adapter.
        With the store unreachable: the newest version held here, else StoreUnavailable.
        """
        version = self._resolve(user_id)
        ticket = SlotTicket(user_id, version, time.monotonic())
        with self._lock:
            ticket.host = self._host_entry(ticket.key)
            loaded = ticket.host is not None and ticket.host.flat is not None
            on_device = ticket.key in self._by_key
            self._counts["hits" if on_device or loaded else "misses"] += 1  # in flight: a miss
            if ticket.host is None and not on_device:
                ticket.host = self._start_load(ticket.key)
        return ticket

    def acquire(self, ticket: SlotTicket) -> int | None:
        """Engine thread, between steps: pin and return the ticket's slot, or None to retry.

        Already resident: refcount + 1. Else, once the host copy is ready, take a free slot or
        evict the least recently used idle one and copy the adapter in (one row copy). Raises
        the load's error, SlotsExhausted when all slots stay pinned past the timeout, or
        AdapterLoadTimeout when the host copy does not arrive in time.
        """
        with self._lock:
            slot = self._by_key.get(ticket.key)
            if slot is None:
                slot = self._place(ticket)
                if slot is None:
                    return None
            elif self._refs[slot] == 0:
                del self._idle[slot]
            self._refs[slot] += 1
            ticket.slot = slot
            return slot

    def release(self, slot: int) -> None:
        """Unpin ``slot``; at refcount 0 it stays resident (LRU) unless its version is stale."""
        with self._lock:
            if self._refs.get(slot, 0) <= 0:
                raise ValueError(f"slot {slot} is not acquired")
            self._refs[slot] -= 1
            if self._refs[slot] == 0:
                if slot in self._stale:
                    self._free_slot(slot)
                else:
                    self._idle[slot] = None

    def invalidate(self, user_id: str) -> None:
        """After delete/re-upload: forget every version but the current one.

        Host copies go at once; idle device slots are freed; pinned slots stay until their
        last release (running requests keep the version they started with).
        """
        try:
            keep: int | None = self.store.meta(user_id).version
        except AdapterNotFound:
            keep = None
        except StoreUnavailable:
            return  # nothing to compare with; the next change-feed reconnect revalidates
        with self._lock:
            for key in [k for k in self._host if k[0] == user_id and k[1] != keep]:
                del self._host[key]
            for key, slot in list(self._by_key.items()):
                if key[0] != user_id or key[1] == keep:
                    continue
                if self._refs[slot] == 0:
                    del self._idle[slot]
                    self._free_slot(slot)
                else:
                    self._stale.add(slot)

    def revalidate(self) -> None:
        """``invalidate`` every user held here (the change feed may have missed writes)."""
        with self._lock:
            users = {key[0] for key in self._by_key} | {key[0] for key in self._host}
        for user_id in sorted(users):
            self.invalidate(user_id)

    def stats(self) -> dict[str, Any]:
        """Adapters/bytes per tier, slot usage, hits/misses/evictions, load latency (ms)."""
        row_bytes = self.bank.layout.num_params * self.bank.rows.element_size()
        try:
            disk: tuple[int, int] | None = self.store.totals()  # a query: outside the lock
        except StoreUnavailable:
            disk = None  # the tiers this process holds are still worth reporting
        with self._lock:
            host_bytes = sum(e.nbytes for e in self._host.values())
            host_n = sum(1 for e in self._host.values() if e.flat is not None)
            used = len(self._slot_key)
            pinned = sum(1 for r in self._refs.values() if r > 0)
            counts = dict(self._counts)
            latency = self._latency.percentiles()
        return {
            "device": {"adapters": used, "bytes": used * row_bytes},
            "host": {"adapters": host_n, "bytes": host_bytes, "capacity": self.host_capacity},
            "disk": {
                "adapters": None if disk is None else disk[0],
                "bytes": None if disk is None else disk[1],
                "reachable": disk is not None,
            },
            "bytes_per_adapter": row_bytes,
            "slots_total": self.bank.num_slots - 1,
            "slots_used": used,
            "slots_free": self.bank.num_slots - 1 - used,
            "slots_pinned": pinned,
            **counts,
            "load_latency_ms": latency,
        }

    def _resolve(self, user_id: str) -> int:
        """The version a new request runs: the store's current one, or during an outage the
        newest held here. After a failed lookup the store is not asked again for
        ``OUTAGE_RECHECK_S`` (requests would each wait out the connection timeout)."""
        if time.monotonic() >= self._store_down_until:
            try:
                return self.store.meta(user_id).version
            except StoreUnavailable:
                self._store_down_until = time.monotonic() + OUTAGE_RECHECK_S
        return self._newest_held(user_id)

    def _newest_held(self, user_id: str) -> int:
        """The store is unreachable: the newest version of ``user_id`` on a slot or in host
        memory (it may be older than the store's if the change feed missed a write)."""
        with self._lock:
            held = [v for u, v in self._by_key if u == user_id]
            held += [v for (u, v), e in self._host.items() if u == user_id and e.flat is not None]
            if held:
                self._counts["unverified"] += 1
                return max(held)
        raise StoreUnavailable(
            f"the adapter store is unreachable and this replica holds no copy of {user_id!r}'s "
            "adapter; retry when the store is back"
        )

    # --- internals; callers hold self._lock ---------------------------------------------

    def _host_entry(self, key: Key) -> HostEntry | None:
        entry = self._host.get(key)
        if entry is not None:
            self._host.move_to_end(key)
        return entry

    def _start_load(self, key: Key) -> HostEntry:
        entry = HostEntry()
        self._host[key] = entry
        self._loader.submit(self._load, key, entry)
        return entry

    def _load(self, key: Key, entry: HostEntry) -> None:
        """Loader thread: disk -> host memory, no lock held during I/O."""
        start = time.perf_counter()
        try:
            flat = self.store.load_flat(*key)
            if self._pin:
                flat = flat.pin_memory()
        except Exception as e:  # delivered to every ticket holding this entry
            with self._lock:
                entry.error = e
                if self._host.get(key) is entry:
                    del self._host[key]
        else:
            with self._lock:
                self._latency.add(time.perf_counter() - start)
                entry.flat = flat  # visible to acquire() under the lock before the event fires
                self._trim_host()
        entry.done.set()
        for listener in self._listeners:
            listener()

    def _trim_host(self) -> None:
        loaded = [k for k, e in self._host.items() if e.flat is not None]
        for key in loaded[: max(0, len(loaded) - self.host_capacity)]:
            del self._host[key]
            self._counts["host_evictions"] += 1

    def _place(self, ticket: SlotTicket) -> int | None:
        """Copy the ticket's host copy into a free or evicted slot; None if not possible yet."""
        entry = ticket.host
        if entry is None:  # was on a device slot at request time, evicted since: reload
            entry = self._host_entry(ticket.key) or self._start_load(ticket.key)
            ticket.host = entry
        if entry.error is not None:
            raise entry.error
        if entry.flat is None:
            self._raise_if_late(ticket, loading=True)
            return None
        slot = self._take_slot()
        if slot is None:
            self._raise_if_late(ticket, loading=False)
            return None
        self.bank.load(slot, entry.flat)
        self._slot_key[slot], self._by_key[ticket.key] = ticket.key, slot
        return slot

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        if not self._idle:
            return None
        slot, _ = self._idle.popitem(last=False)
        del self._by_key[self._slot_key.pop(slot)]
        self._counts["evictions"] += 1
        return slot

    def _free_slot(self, slot: int) -> None:
        key = self._slot_key.pop(slot)
        del self._by_key[key]
        self._stale.discard(slot)
        self._free.append(slot)

    def _raise_if_late(self, ticket: SlotTicket, loading: bool) -> None:
        """The ticket may wait longer, or it waited past the acquire timeout: raise why."""
        waited = time.monotonic() - ticket.created
        if waited <= self.acquire_timeout_s:
            return
        if loading:
            raise AdapterLoadTimeout(
                f"adapter {ticket.user_id!r} v{ticket.version} did not reach host memory in "
                f"{waited:.1f} s (acquire_timeout_s={self.acquire_timeout_s})"
            )
        n = self.bank.num_slots - 1
        raise SlotsExhausted(
            f"all {n} adapter slots stayed pinned by in-flight requests for {waited:.1f} s; "
            f"could not place {ticket.user_id!r} (raise num_slots or retry later)"
        )

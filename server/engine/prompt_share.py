"""Which live prompt a new one may start from: the longest shared prefix, same client and adapter.

The K/V of a prompt's position depend only on the tokens up to it and on the adapter that
computed them. So a prompt that begins with the same tokens as a live sequence's prompt (the
``n`` choices of one request, a system prompt or few-shot preamble that a client sends with
every request, the history of a conversation) needs those positions computed once: the
scheduler copies them from the live sequence's KV row and prefills only the rest
(``scheduler``).

Sharing is only ever within one client (its tenant) and one adapter version (the user's): a
copy never crosses tenants, so the time a prompt takes tells nobody what another tenant sends.

Lookup is by the first ``min_tokens`` tokens (a dict), then the longest common prefix among the
few most recent live prompts under that key, and the finished requests' K/V kept under it
(``prefix_cache.PrefixCache``: the turns of a conversation). A prompt shorter than that is
shared only with an identical live one.
"""

from __future__ import annotations

from collections import deque

from server.engine.prefix_cache import CachedPrefix, PrefixCache
from server.engine.sequence import Sequence, Status

CANDIDATES = 8  # live prompts kept per key: the most recent ones


class PromptIndex:
    def __init__(self, min_tokens: int, cache: PrefixCache | None = None) -> None:
        """``min_tokens``: the shortest shared prefix worth a copy (0: identical prompts only).
        ``cache``: finished requests' K/V, searched with the live prompts."""
        if min_tokens < 0:
            raise ValueError("min_tokens must be >= 0")
        self.min_tokens = min_tokens
        self.cache = cache
        self._live: dict[tuple, deque[Sequence]] = {}
        self._entries = 0

    def link(self, seq: Sequence, live: int) -> None:
        """Give ``seq`` the live sequence or cached context it starts from (``parent``) and how
        many positions it copies (``shared``, at most ``len(prompt) - 1``: the last prompt
        token is computed for its own logits), if any; then index it. ``live``: sequences
        waiting or running, which bounds what the index holds (dead entries are swept when it
        grows past twice that).
        A sequence that scores its prompt computes it all (it scores its own)."""
        if self._entries > 2 * live + 64:
            self._sweep()
        key = self.key(seq)
        self._find(seq, key)
        bucket = self._live.setdefault(key, deque(maxlen=CANDIDATES))
        if len(bucket) == CANDIDATES:
            self._entries -= 1
        bucket.append(seq)
        self._entries += 1

    def relink(self, seq: Sequence) -> None:
        """``seq``'s parent ended before giving its positions: look again (its K/V may be in
        the cache now, or a running prompt may give them; not one queued after it, which
        would wait for it)."""
        seq.parent, seq.shared = None, 0
        self._find(seq, self.key(seq), running_only=True)

    def __len__(self) -> int:
        return self._entries

    def key(self, seq: Sequence) -> tuple:
        """Where ``seq``'s prompt is looked up: (client, user, adapter version, first tokens)."""
        head = seq.prompt_ids[: self.min_tokens] if self.min_tokens else seq.prompt_ids
        return (seq.client, seq.user_id, seq.adapter_version, tuple(head))

    def _find(self, seq: Sequence, key: tuple, running_only: bool = False) -> None:
        """Set ``seq.parent`` and ``seq.shared`` to the source with the longest common prefix:
        a live prompt (an identical one even below ``min_tokens``) or a cached context."""
        prompt = seq.prompt_ids
        if seq.params.prompt_logprobs is not None or len(prompt) < 2:
            return
        best: Sequence | CachedPrefix | None = None
        best_len = 0
        for other in self._live.get(key, ()):
            if other is seq or not _alive(other):
                continue
            if not running_only or other.status is Status.RUNNING:
                n = _longer_prefix(prompt, other.prompt_ids, best_len)
                if n > best_len:
                    best, best_len = other, n
        identical = best_len == len(prompt)
        if self.cache is not None and self.min_tokens:
            for entry in self.cache.candidates(key):  # only one that shares more is useful:
                n = _longer_prefix(prompt, entry.token_ids, min(best_len, len(prompt) - 1))
                if n > best_len:
                    best, best_len = entry, n
        shared = min(best_len, len(prompt) - 1)
        if best is not None and (identical or shared >= self.min_tokens > 0):
            seq.parent, seq.shared = best, shared

    def _sweep(self) -> None:
        """Drop every ended sequence (and keys left empty)."""
        for key in list(self._live):
            bucket = deque((s for s in self._live[key] if _alive(s)), maxlen=CANDIDATES)
            if bucket:
                self._live[key] = bucket
            else:
                del self._live[key]
        self._entries = sum(len(b) for b in self._live.values())


def _alive(seq: Sequence) -> bool:
    return seq.status is not Status.FINISHED and not seq.cancelled.is_set()


def _longer_prefix(a: list[int], b: list[int], than: int) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` if it is longer than ``than``,
    else 0: one comparison of ``than + 1`` tokens rules most candidates out."""
    k = than + 1
    if min(len(a), len(b)) < k or a[:k] != b[:k]:
        return 0
    return _common_prefix(a, b, k)


def _common_prefix(a: list[int], b: list[int], lo: int = 0) -> int:
    """Length of the longest common prefix of ``a`` and ``b``, known to be at least ``lo``
    (binary search on slices: list comparison runs in C, so a few thousand tokens cost
    microseconds)."""
    hi = min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo

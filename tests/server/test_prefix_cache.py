"""The prefix cache alone: what it keeps, what it drops, what it counts."""

from __future__ import annotations

import torch

from server.engine.detokenizer import StopChecker
from server.engine.prefix_cache import PER_KEY, PrefixCache
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Channel, Sequence


class Rows:
    """Position p of any row holds p (one layer, one head): 4 bytes a position."""

    def read_row(self, row: int, length: int) -> torch.Tensor:
        return torch.arange(length, dtype=torch.float32).view(1, 1, length, 1)


def ended(prompt: list[int], output: list[int], client: str = "ana") -> Sequence:
    params = SamplingParams()
    seq = Sequence("r", None, prompt, params, Channel(), StopChecker(None, params.stop), client)
    seq.output_ids = output
    seq.num_cached = len(prompt) + len(output) - 1
    return seq


def test_keeps_only_what_can_be_shared_and_fits() -> None:
    cache = PrefixCache(max_bytes=100 * 4, min_tokens=16)
    assert cache.retain(ended(list(range(10)), [1, 2]), "k", Rows(), 0) is None  # 11 < 16
    assert cache.retain(ended(list(range(200)), [1]), "k", Rows(), 0) is None  # over the bound
    assert cache.retain(ended(list(range(20)), [1]), "k", Rows(), -1) is None  # no row
    scoring = ended(list(range(20)), [])
    scoring.params = SamplingParams(prompt_logprobs=0, max_new_tokens=0)
    assert cache.retain(scoring, "k", Rows(), 0) is None  # an evaluation's choices
    entry = cache.retain(ended(list(range(20)), [1, 2]), "k", Rows(), 0)
    assert entry is not None and entry.token_ids == [*range(20), 1] and entry.nbytes == 21 * 4
    assert len(cache) == 1 and cache.nbytes == 84
    assert (
        PrefixCache(max_bytes=0, min_tokens=16).retain(ended(list(range(20)), [1]), "k", Rows(), 0)
        is None
    )
    assert not PrefixCache(max_bytes=1 << 20, min_tokens=0).enabled  # sharing off: no cache


def test_a_context_already_held_only_refreshes_its_entry() -> None:
    """The same prompt sent again, answered the same way: nothing new is kept, and the entry
    it matched becomes the most recently used (the last to be evicted)."""
    cache = PrefixCache(max_bytes=1 << 20, min_tokens=16)
    a = cache.retain(ended(list(range(20)), [1, 2, 3]), "k", Rows(), 0)
    b = cache.retain(ended(list(range(100, 120)), [1]), "k", Rows(), 0)
    assert a is not None and b is not None and a.used < b.used
    assert cache.retain(ended(list(range(20)), [1, 2]), "k", Rows(), 0) is None
    assert a.used > b.used and len(cache) == 2 and cache.retained == 2


def test_entries_per_key_are_bounded_and_the_least_recent_goes() -> None:
    cache = PrefixCache(max_bytes=1 << 30, min_tokens=16)
    kept = [cache.retain(ended([i, *range(20)], [1]), "k", Rows(), 0) for i in range(PER_KEY)]
    cache.restored(kept[0], 10)  # the oldest is used again
    cache.retain(ended([999, *range(20)], [1]), "k", Rows(), 0)
    assert len(cache.candidates("k")) == PER_KEY and kept[0].alive and not kept[1].alive
    assert cache.stats()["evicted"] == 1 and cache.stats()["hits"] == 1
    cache.clear()
    assert (len(cache), cache.nbytes, cache.candidates("k")) == (0, 0, [])

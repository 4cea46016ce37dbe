"""The base model's reference answers kept on disk: same key, same references; anything else
(another model, prompts or settings; an unreadable file) makes them again."""

from __future__ import annotations

import torch

from server.finetune.references import ReferenceCache, reference_key
from vera_core.retention import Reference


def refs() -> list[Reference]:
    g = torch.Generator().manual_seed(0)
    return [
        Reference(
            [1, 5, 7, 9, 2],
            3,
            torch.randint(0, 50, (2, 4), generator=g),
            torch.randn(2, 4, generator=g),
            "ab",
        ),
        Reference(
            [1, 6, 3, 2],
            2,
            torch.randint(0, 50, (2, 4), generator=g),
            torch.randn(2, 4, generator=g),
            "c",
        ),
    ]


def test_round_trip_and_keys(tmp_path) -> None:
    cache = ReferenceCache(tmp_path / "references")
    key = reference_key("fp-1", ["a?", "b?"], max_new_tokens=24, top_k=4)
    assert cache.load(key) is None
    cache.save(key, refs())
    back = cache.load(key)
    assert back is not None and len(back) == 2
    for a, b in zip(refs(), back):
        assert (a.input_ids, a.start, a.answer) == (b.input_ids, b.start, b.answer)
        assert torch.equal(a.top_ids, b.top_ids) and torch.equal(a.top_logp, b.top_logp)
    others = {
        reference_key("fp-2", ["a?", "b?"], max_new_tokens=24, top_k=4),
        reference_key("fp-1", ["a?"], max_new_tokens=24, top_k=4),
        reference_key("fp-1", ["a?", "b?"], max_new_tokens=32, top_k=4),
    }
    assert key not in others and len(others) == 3
    assert all(cache.load(k) is None for k in others)


def test_an_unreadable_file_is_made_again(tmp_path) -> None:
    cache = ReferenceCache(tmp_path)
    key = reference_key("fp", ["q"], top_k=4)
    cache.save(key, refs())
    (tmp_path / f"{key}.pt").write_bytes(b"not a torch file")
    assert cache.load(key) is None
    cache.save(key, refs())
    assert cache.load(key) is not None

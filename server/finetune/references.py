"""The base model's reference answers (``vera_core.retention``), kept on disk per model.

Making them costs a minute of a small CPU (a hundred greedy answers and their distributions);
they depend only on the base model, the prompts and how they were made, so a server makes them
once per model and every later process (a restart, a replica on the same host) reads them back.
A file that cannot be read is made again; writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from vera_core.fingerprint import model_fingerprint
from vera_core.general_prompts import ANCHOR_PROMPTS
from vera_core.retention import REFERENCE_TOKENS, REFERENCE_TOP_K, Reference, base_references

log = logging.getLogger(__name__)


def reference_key(fingerprint: str, prompts: Sequence[str], **settings: int) -> str:
    """What a set of references depends on, as a file-name-safe digest."""
    blob = json.dumps([fingerprint, list(prompts), sorted(settings.items())]).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


class ReferenceCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str) -> list[Reference] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            data = torch.load(path, weights_only=True)
            return [
                Reference(ids, start, top_ids, top_logp, answer)
                for ids, start, top_ids, top_logp, answer in zip(
                    data["input_ids"],
                    data["start"],
                    data["top_ids"],
                    data["top_logp"],
                    data["answer"],
                )
            ]
        except Exception as e:  # unreadable (truncated, another version): make them again
            log.warning("reference answers in %s unreadable (%s); making them again", path, e)
            return None

    def get(self, key: str, count: int, make: Callable[[], list[Reference]]) -> list[Reference]:
        """The ``count`` references kept under ``key``, else ``make()``'s, kept for next time."""
        refs = self.load(key)
        if refs is None or len(refs) != count:
            refs = make()
            self.save(key, refs)
        return refs

    def save(self, key: str, refs: Sequence[Reference]) -> None:
        data = {
            "input_ids": [r.input_ids for r in refs],
            "start": [r.start for r in refs],
            "top_ids": [r.top_ids for r in refs],
            "top_logp": [r.top_logp for r in refs],
            "answer": [r.answer for r in refs],
        }
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self._path(key).with_suffix(f".tmp{os.getpid()}")
            torch.save(data, tmp)
            os.replace(tmp, self._path(key))
        except OSError as e:  # a read-only home: the references live in memory only
            log.warning("could not keep reference answers in %s: %s", self.root, e)


def anchor_references(model: PreTrainedModel, tokenizer: Any, root: Path) -> list[Reference]:
    """The base model's references on the shipped anchor prompts, from ``root`` when made
    before (an offline trainer's: generated here, in this thread)."""
    key = reference_key(
        model_fingerprint(model),
        ANCHOR_PROMPTS,
        max_new_tokens=REFERENCE_TOKENS,
        top_k=REFERENCE_TOP_K,
    )
    make = partial(
        base_references,
        model,
        tokenizer,
        ANCHOR_PROMPTS,
        max_new_tokens=REFERENCE_TOKENS,
        top_k=REFERENCE_TOP_K,
    )
    return ReferenceCache(root).get(key, len(ANCHOR_PROMPTS), make)

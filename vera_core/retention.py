"""Keeping what the base model knew: its own answers as a reference, a KL penalty towards them,
and the measures a job reports (recall of its training data, retention of general answers).

The base model is free here: it is the same weights with no adapter row, so its answer to any
prompt costs one greedy generation, done once per process. A ``Reference`` keeps, for each
token of that answer, the base model's top-k next-token distribution; training adds

    KL(p_base || p_adapted)  over the k tokens and one bin for the rest of the vocabulary

at every answer position (the forward KL that "RL's Razor" finds predicts forgetting), so the
adapter may change what it must and pays for moving anything else.

A training example is *recalled* when greedy decoding reproduces its completion (teacher-forced:
the argmax at every completion position is the completion's token, one forward); a probe
question the base model answers right (its answer holds the question's key) is *retained* when
the adapted model's greedy answer holds the key too (generated, as long as the base answer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch

from vera_core.inject import VeraModel
from vera_core.train_data import IGNORE, Example

REFERENCE_TOKENS = 24  # longest base-model answer kept as a reference
REFERENCE_TOP_K = 16  # tokens of the base model's distribution kept at each answer position

T = TypeVar("T")
Runner = Callable[[Callable[[], T]], T]  # runs one unit of work (the server: on its engine)


def _direct(fn: Callable[[], T]) -> T:
    return fn()


@dataclass(frozen=True, eq=False)
class Reference:
    """The base model's greedy answer to one prompt and its distribution along that answer."""

    input_ids: list[int]  # prompt + answer
    start: int  # index of the first answer token
    top_ids: torch.Tensor  # [n_answer, k] long: the base's top-k tokens at each answer position
    top_logp: torch.Tensor  # [n_answer, k] float32: their log-probabilities
    answer: str  # the answer's text

    @property
    def answer_ids(self) -> list[int]:
        return self.input_ids[self.start :]


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """A user turn as the model is asked it: its chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
        )
        return list(ids)
    return list(tokenizer(text)["input_ids"])


def _right_padded(seqs: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and attention mask [len(seqs), width], right-padded."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
    return ids, mask


def base_references(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = REFERENCE_TOKENS,
    top_k: int = REFERENCE_TOP_K,
    chunk: int = 8,
    run: Runner = _direct,
    answers: Callable[[list[list[int]]], list[list[int]]] | None = None,
) -> list[Reference]:
    """The greedy answers of ``model`` (a causal LM; a VeRA-injected one outside any forward
    context is the base model) to ``prompts``, EOS kept (stopping is behaviour too), and its
    top-k log-probabilities along them; ``chunk`` prompts per ``run`` unit. ``answers``: the
    greedy answers of the same model to every prompt's ids at once (a server's batched engine),
    in place of ``generate`` in the units; only the forward for the top-k then runs in them."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    lm: Any = model  # transformers' generate
    out: list[Reference] = []

    def greedy(asked: list[list[int]]) -> list[list[int]]:
        gen = _greedy_ids(lm, asked, max_new_tokens, pad, device)
        out = []
        for row in gen:
            if eos is not None and eos in row:
                row = row[: row.index(eos) + 1]
            out.append(row)
        return out

    def one_chunk(asked: list[list[int]], given: list[list[int]] | None) -> list[Reference]:
        found = given if given is not None else greedy(asked)
        answers = [a or [eos if eos is not None else pad] for a in found]
        seqs = [p + a for p, a in zip(asked, answers)]
        full, full_mask = (t.to(device) for t in _right_padded(seqs, pad))
        with torch.no_grad():
            logits = lm(input_ids=full, attention_mask=full_mask, use_cache=False).logits
        refs = []
        for row, (p, a) in enumerate(zip(asked, answers)):
            at = logits[row, len(p) - 1 : len(p) - 1 + len(a)].float().log_softmax(-1)  # [n, V]
            logp, top = at.topk(top_k, dim=-1)
            text = tokenizer.decode(a, skip_special_tokens=True)
            refs.append(Reference(p + a, len(p), top.cpu(), logp.cpu(), text))
        return refs

    asked = [prompt_ids(tokenizer, t) for t in prompts]
    given = answers(asked) if answers is not None else None
    for start in range(0, len(asked), chunk):
        part = asked[start : start + chunk]
        got = None if given is None else given[start : start + chunk]
        out += run(partial(one_chunk, part, got))
    return out


def anchor_kl_sum(logits: torch.Tensor, refs: Sequence[Reference]) -> torch.Tensor:
    """Summed KL(base || adapted) over every answer position of ``refs``, on k + 1 bins (the
    base's top-k tokens and the rest of the vocabulary); ``logits`` [len(refs), width, V] of
    the right-padded ``refs``."""
    rows = torch.cat([torch.full((len(r.answer_ids),), i) for i, r in enumerate(refs)])
    cols = torch.cat([torch.arange(r.start - 1, len(r.input_ids) - 1) for r in refs])
    top_ids = torch.cat([r.top_ids for r in refs]).to(logits.device)  # [N, k]
    p_logp = torch.cat([r.top_logp for r in refs]).to(logits.device)  # [N, k]
    q_all = logits[rows.to(logits.device), cols.to(logits.device)].float().log_softmax(-1)
    q_logp = q_all.gather(-1, top_ids)  # [N, k]
    p = p_logp.exp()
    # the rest bin: log(1 - sum p) and log(1 - sum q), kept finite
    p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
    q_rest = torch.log1p(-q_logp.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (p * (p_logp - q_logp)).sum(-1) + p_rest * (p_rest.log() - q_rest)
    return kl.sum()


@dataclass(frozen=True, eq=False)
class ProbeItem:
    """One probe question, the base model's answer to it and whether that answer is right."""

    ref: Reference
    key: str  # a right answer holds it (case-insensitive)

    @property
    def base_right(self) -> bool:
        return self.key.casefold() in self.ref.answer.casefold()


def probe_items(refs: Sequence[Reference], keys: Sequence[str]) -> list[ProbeItem]:
    """Pair each probe question's reference with its key."""
    return [ProbeItem(ref, key) for ref, key in zip(refs, keys)]


def _argmax_rows(
    vm: VeraModel, vector: torch.Tensor | None, seqs: Sequence[list[int]], pad: int
) -> torch.Tensor:
    """Greedy next tokens [len(seqs), width] under ``vector`` (None: the base model)."""
    device = vm.projections.A.device
    ids, mask = (t.to(device) for t in _right_padded(seqs, pad))
    with torch.no_grad():
        if vector is None:
            logits = vm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        else:
            with vm.vector(vector.detach(), ids.shape[0]):
                logits = vm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return logits.argmax(-1).cpu()


def _generate(
    vm: VeraModel, vector: torch.Tensor, asked: Sequence[list[int]], new_tokens: int, pad: int
) -> list[list[int]]:
    """Greedy answers under ``vector`` to ``asked`` (one left-padded batch)."""
    with vm.vector(vector.detach(), len(asked)):
        return _greedy_ids(vm.model, asked, new_tokens, pad, vm.projections.A.device)


def _greedy_ids(
    lm: Any, asked: Sequence[list[int]], new_tokens: int, pad: int, device: torch.device
) -> list[list[int]]:
    """``lm.generate``'s greedy continuations of ``asked`` (one left-padded batch), new tokens
    only."""
    width = max(map(len, asked))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in asked], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in asked], device=device)
    with torch.no_grad():
        out = lm.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
        )
    return out[:, width:].tolist()


@dataclass(frozen=True)
class Quality:
    """What a trained adapter recalls and keeps (teacher-forced greedy, see the module doc)."""

    recalled: int  # training examples whose completion greedy decoding reproduces
    examples: int
    retained: int  # probe questions the base answers right that the adapter still does
    base_right: int

    @property
    def recall(self) -> float:
        return self.recalled / max(1, self.examples)

    @property
    def retention(self) -> float:
        return self.retained / self.base_right if self.base_right else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {
            "recall": round(self.recall, 4),
            "recalled": self.recalled,
            "examples": self.examples,
            "retention": None if math.isnan(self.retention) else round(self.retention, 4),
            "retained": self.retained,
            "base_right": self.base_right,
        }


def measure_quality(
    vm: VeraModel,
    vector: torch.Tensor,
    examples: Sequence[Example],
    probe: Sequence[ProbeItem],
    tokenizer: Any,
    *,
    chunk: int = 8,
    run: Runner = _direct,
) -> Quality:
    """Recall of ``examples`` and retention of ``probe`` under ``vector``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    recalled = 0
    for start in range(0, len(examples), chunk):
        group = examples[start : start + chunk]

        def recall_unit(group: Sequence[Example] = group) -> int:
            top = _argmax_rows(vm, vector, [e.input_ids for e in group], pad)
            hits = 0
            for row, e in enumerate(group):
                labels = torch.tensor(e.labels[1:])
                at = labels != IGNORE
                hits += bool((top[row, : len(labels)][at] == labels[at]).all())
            return hits

        recalled += run(recall_unit)
    right = [item for item in probe if item.base_right]
    retained = 0
    for start in range(0, len(right), chunk):
        items = right[start : start + chunk]

        def retain_unit(items: Sequence[ProbeItem] = items) -> int:
            asked = [i.ref.input_ids[: i.ref.start] for i in items]
            longest = max(len(i.ref.answer_ids) for i in items)
            answers = _generate(vm, vector, asked, longest, pad)
            texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
            return sum(i.key.casefold() in t.casefold() for i, t in zip(items, texts))

        retained += run(retain_unit)
    return Quality(recalled, len(examples), retained, len(right))

"""Turns a step plan into model forwards: batched prefill and one-token decode.

Owns the KV cache (capacity, compaction, clearing) and hands it to a Hugging Face causal LM as
its cache, with explicit 4D masks and per-row positions. Everything one forward needs beyond
its inputs (where the KV cache writes, each row's adapter slot) is set by ``_forward_context``
in one place and reset in its ``finally``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from server.engine.kv_cache import KVStep, SlotKVCache
from server.engine.scheduler import StepPlan
from server.engine.sequence import Sequence
from vera_core.inject import VeraModel


class ModelRunner:
    def __init__(self, vm: VeraModel, max_rows: int, max_len: int) -> None:
        self.vm = vm
        self.model = vm.model
        param = next(self.model.parameters())
        self.device = param.device
        cfg = self.model.config
        num_layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
        self.kv = SlotKVCache(num_layers, max_rows, max_len)  # buffers take K/V's device, dtype
        # transformers >= 5.2x renamed past_key_values -> cache
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.max_len = max_len

    # -- one step -------------------------------------------------------------------------
    def run(
        self, plan: StepPlan, running: list[Sequence]
    ) -> tuple[list[Sequence], torch.Tensor] | None:
        """Prefill ``plan.prefill``, decode the live rows of ``plan.decode``: the sequences
        that produced logits, and those logits [len(seqs), vocab] in float32; None if none."""
        if not running:
            return None
        need = max(s.num_tokens + 1 for s in running)
        self.kv.reserve(len(running), min(need, self.max_len))
        seqs: list[Sequence] = []
        logits: list[torch.Tensor] = []  # [rows, vocab] per forward
        if plan.prefill:
            seqs += plan.prefill
            logits.append(self.prefill(plan.prefill))
        live = [not s.cancelled.is_set() for s in plan.decode]
        if any(live):  # rows are compact: decode them all, drop the cancelled ones' tokens
            seqs += [s for s, ok in zip(plan.decode, live) if ok]
            out = self.decode(plan.decode)
            logits.append(out if all(live) else out[torch.tensor(live, device=out.device)])
        if not seqs:
            return None
        return seqs, (logits[0] if len(logits) == 1 else torch.cat(logits)).float()

    def move_row(self, src: int, dst: int, seq: Sequence) -> None:
        """``seq`` moved from KV row ``src`` to ``dst`` (the scheduler keeps rows compact)."""
        self.kv.move_row(src, dst, length=seq.num_cached)

    def clear_row(self, seq: Sequence) -> None:
        """Zero what ``seq`` wrote (its values were not finite): the row's next owner reads
        masked columns too, and 0 * NaN is NaN."""
        self.kv.clear_row(seq.kv_row, seq.num_cached + 1)

    def idle(self) -> None:
        """Nothing is running: free the KV buffers."""
        self.kv.release_all()

    # -- forwards -------------------------------------------------------------------------
    @contextmanager
    def _forward_context(self, step: KVStep, slots: list[int]) -> Iterator[None]:
        """The per-forward context: where the KV cache writes, each row's adapter slot."""
        use = torch.tensor(slots, device=self.device) if any(slots) else None  # 0s: skip VeRA
        self.kv.step = step
        try:
            with self.vm.slots(use):
                yield
        finally:
            self.kv.step = None

    def _forward(
        self,
        ids: torch.Tensor,  # [batch, tokens]
        mask: torch.Tensor,  # [batch, 1, tokens, kv_len] bool, True = attend
        pos: torch.Tensor,  # [batch, tokens] position ids
        slots: list[int],  # adapter slot per row (0 = base model)
        step: KVStep,
    ) -> torch.Tensor:
        with self._forward_context(step, slots):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: self.kv},
            )
        return out.logits[:, -1]  # [batch, vocab]

    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """All admitted prompts in one left-padded forward: [len(seqs), vocab] last logits."""
        lens = [len(s.prompt_ids) for s in seqs]
        width = max(lens)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        pos = torch.zeros(len(seqs), width, dtype=torch.long)
        keep = torch.zeros(len(seqs), width, dtype=torch.bool)  # real (non-pad) tokens
        for i, (s, n) in enumerate(zip(seqs, lens)):
            ids[i, width - n :] = torch.tensor(s.prompt_ids)
            pos[i, width - n :] = torch.arange(n)
            keep[i, width - n :] = True
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = causal[None] & keep[:, None, :]  # [B, query, key]
        mask |= torch.eye(width, dtype=torch.bool)[None]  # pad rows see themselves: no NaN
        step = KVStep(kv_len=width, prefill_rows=[s.kv_row for s in seqs], prefill_lens=lens)
        logits = self._forward(
            ids.to(self.device),
            mask[:, None].to(self.device),
            pos.to(self.device),
            [s.adapter_slot for s in seqs],
            step,
        )
        for s, n in zip(seqs, lens):
            s.num_cached = n
        return logits

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One new token for every running row (rows 0..n-1, in order): [n, vocab] logits."""
        ids = torch.tensor([[s.output_ids[-1]] for s in seqs], device=self.device)
        positions = torch.tensor([s.num_cached for s in seqs], device=self.device)
        kv_len = int(positions.max()) + 1
        cols = torch.arange(kv_len, device=self.device)
        mask = (cols[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, kv_len]
        step = KVStep(rows=len(seqs), positions=positions, kv_len=kv_len)
        logits = self._forward(ids, mask, positions[:, None], [s.adapter_slot for s in seqs], step)
        for s in seqs:
            s.num_cached += 1
        return logits

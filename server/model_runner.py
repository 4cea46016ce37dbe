"""Turns scheduled sequences into model forwards: batched prefill and one-token decode.

Owns the KV cache and knows how to hand it to a Hugging Face causal LM (as its cache, with
explicit 4D masks and per-row positions), and sets each row's adapter slot for the forward.
"""

from __future__ import annotations

import inspect

import torch

from server.kv_cache import KVStep, SlotKVCache
from server.sequence import Sequence
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

    def _forward(
        self,
        ids: torch.Tensor,  # [batch, tokens]
        mask: torch.Tensor,  # [batch, 1, tokens, kv_len] bool, True = attend
        pos: torch.Tensor,  # [batch, tokens] position ids
        slots: list[int],  # adapter slot per row (0 = base model)
        step: KVStep,
    ) -> torch.Tensor:
        self.kv.step = step
        use = torch.tensor(slots, device=self.device) if any(slots) else None  # 0s: skip VeRA
        with self.vm.slots(use):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: self.kv},
            )
        self.kv.step = None
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

"""A live tiny-model server with one user's adapter, and an fp32 oracle for it (transformers
for the base model, PEFT's VeRA for the adapter)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from live import adapter_bytes, build_tiny_model, random_adapter, start_server
from openai import OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parents[1] / "vera_core"))

from peft_oracle import peft_vera, set_peft_vectors  # noqa: E402

from vera_core import VeraConfig, inject_vera  # noqa: E402

R = 8


class Tiny:
    """The live server, its model dir, an fp32 oracle, and a user with an adapter."""

    def __init__(self, tmp: Path) -> None:
        self.dir = build_tiny_model(tmp / "tiny-model")
        self.live = start_server(
            tmp, "--model", str(self.dir), "--r", str(R), "--max-seq-len", "256"
        )
        self.tok = AutoTokenizer.from_pretrained(self.dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.dir, dtype=torch.float32).eval()
        vm = inject_vera(AutoModelForCausalLM.from_pretrained(self.dir), VeraConfig(r=R), 2)
        self.adapter = random_adapter(vm, 7, scale=0.5)
        self.key = self.live.new_user("eve")
        with self.live.client(self.key) as c:
            r = c.put(
                "/users/eve/adapter",
                content=adapter_bytes(self.adapter),
                headers={"Content-Type": "application/octet-stream"},
            )
            assert r.status_code == 201, r.text
        self.peft = peft_vera(self.model, VeraConfig(r=R))
        self.name = self.dir.name
        self.r = R

    def fresh_model(self):
        """Another fp32 copy of the tiny model."""
        return AutoModelForCausalLM.from_pretrained(self.dir, dtype=torch.float32).eval()

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.live.url}/v1", api_key=self.key, max_retries=0)

    @torch.no_grad()
    def log_softmax(self, ids: list[int], adapter: bool = False) -> torch.Tensor:
        """[len(ids), vocab] fp32 log-softmax of the base model, or PEFT with eve's adapter."""
        if adapter:
            set_peft_vectors(self.peft, self.adapter)
            logits = self.peft(input_ids=torch.tensor([ids])).logits[0]
        else:
            logits = self.model(input_ids=torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    def greedy(self, ids: list[int], n: int, adapter: bool = False) -> list[int]:
        out = list(ids)
        for _ in range(n):
            out.append(int(self.log_softmax(out, adapter)[-1].argmax()))
        return out[len(ids) :]

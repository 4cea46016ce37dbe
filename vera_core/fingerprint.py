"""A short, dtype-independent identity of a base model, stamped into every adapter file.

Two models get the same fingerprint when they have the same architecture numbers and, in the
weights sampled below, the same values to 3 significant digits (fp32, bf16 and fp16 copies of one
checkpoint agree; different checkpoints of one architecture do not).
"""

from __future__ import annotations

import hashlib
import json

from transformers import PreTrainedModel

_CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "n_embd",
    "intermediate_size",
    "num_hidden_layers",
    "n_layer",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
)


def model_fingerprint(model: PreTrainedModel) -> str:
    cfg = model.config
    arch = {k: getattr(cfg, k) for k in _CONFIG_KEYS if getattr(cfg, k, None) is not None}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    params = dict(model.named_parameters())
    for name in sorted(params)[:: max(1, len(params) // 8)][:8]:
        flat = params[name].detach().float().flatten()[:4096]
        stats = [flat.abs().mean().item(), flat.std().item() if flat.numel() > 1 else 0.0]
        h.update(name.replace(".base_layer", "").encode())
        h.update(",".join(f"{s:.3g}" for s in stats).encode())
    return h.hexdigest()[:16]

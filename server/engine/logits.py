"""What the sampler does to a row's logits before it samples: penalties, bias, masks.

For row ``b`` with generated tokens ``out_b`` and context (prompt + generated) ``ctx_b``, in
this order (vLLM's and Hugging Face's definitions):

* repetition (HF):  ``l[t] = l[t] / r if l[t] > 0 else l[t] * r``  for ``t`` in ``ctx_b``
* frequency and presence (OpenAI):  ``l[t] -= f * count(t, out_b) + p * [count(t, out_b) > 0]``
* ``logit_bias``:  ``l[t] += bias[t]``
* ``min_tokens``: while ``len(out_b) < min_tokens``, ``l[t] = -inf`` for EOS and the row's
  ``stop_token_ids``.

Only the rows that set a control are touched, all of them at once: their token histories
become one padded tensor and the counts one ``scatter_add``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from server.engine.sampling_params import SamplingParams


def apply_controls(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompts: Sequence[list[int]],
    outputs: Sequence[list[int]],
    eos_ids: Collection[int],
) -> torch.Tensor:
    """logits: [batch, vocab] float32 -> the same with every row's controls applied (a new
    tensor when some row has controls, ``logits`` itself otherwise)."""
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return logits
    logits = logits.clone()
    device, vocab = logits.device, logits.shape[-1]
    idx = torch.tensor(rows, device=device)  # [R]
    sub = logits[idx]  # [R, vocab]
    ps = [params[i] for i in rows]

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)[:, None]  # [R, 1]

    rep = column([p.repetition_penalty for p in ps])
    if bool((rep != 1).any()):
        seen = _counts([prompts[i] + outputs[i] for i in rows], vocab, device) > 0  # [R, vocab]
        penalized = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalized, sub)
    freq = column([p.frequency_penalty for p in ps])
    pres = column([p.presence_penalty for p in ps])
    if bool((freq != 0).any() or (pres != 0).any()):
        counts = _counts([outputs[i] for i in rows], vocab, device)  # [R, vocab]
        sub = sub - freq * counts - pres * (counts > 0).float()
    biases = [(r, t, b) for r, p in enumerate(ps) for t, b in p.logit_bias]
    if biases:
        r, t, b = zip(*biases)
        bias = torch.zeros_like(sub)
        bias.index_put_(
            (torch.tensor(r, device=device), torch.tensor(t, device=device)),
            torch.tensor(b, dtype=sub.dtype, device=device),
            accumulate=True,
        )
        sub = sub + bias
    held = [
        (r, t)
        for r, (i, p) in enumerate(zip(rows, ps))
        if len(outputs[i]) < p.min_tokens
        for t in (*eos_ids, *p.stop_token_ids)
    ]
    if held:
        r, t = zip(*held)
        sub = sub.index_put(
            (torch.tensor(r, device=device), torch.tensor(t, device=device)),
            torch.tensor(float("-inf"), device=device),
        )
    logits[idx] = sub
    return logits


def _counts(histories: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] float32: how often each token occurs in each row's history."""
    width = max(1, max(len(h) for h in histories))
    ids = torch.zeros(len(histories), width, dtype=torch.long)
    ones = torch.zeros(len(histories), width)
    for r, h in enumerate(histories):  # one copy per row, not per token
        if h:
            ids[r, : len(h)] = torch.tensor(h)
            ones[r, : len(h)] = 1.0
    counts = torch.zeros(len(histories), vocab, device=device)
    return counts.scatter_add_(1, ids.to(device), ones.to(device))

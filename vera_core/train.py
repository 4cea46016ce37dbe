"""Fine-tune one user's d and b; base weights and the shared A, B stay frozen.

Examples are chat ``messages`` (loss on the last assistant turn) or ``prompt``/``completion``
pairs (loss on the completion). The same batched VeRA layers serve and train: training points
the model at a 2-slot bank whose rows are an ``nn.Parameter`` and runs every row with slot 1.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vera_core.adapter import Adapter, AdapterHeader
from vera_core.bank import VeraBank
from vera_core.fingerprint import model_fingerprint
from vera_core.inject import VeraModel

IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 8
    lr: float = 5e-2  # VeRA's vectors want far higher rates than LoRA (paper: 1e-3 .. 1e-1)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_length: int = 512
    seed: int = 0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0 or self.max_length <= 8:
            raise ValueError("epochs, batch_size must be > 0 and max_length > 8")
        if not 0 < self.lr < 10:
            raise ValueError(f"lr {self.lr} out of range (0, 10)")


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON: {e}") from None
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows


def encode_example(row: dict[str, Any], tokenizer: Any, max_length: int) -> Example:
    """Tokenize one row; labels mask everything but the completion / last assistant turn."""
    if "messages" in row:
        messages = row["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("a 'messages' example must end with an assistant message")
        prompt_ids = tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        full_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("chat template renders the prompt differently inside the full chat")
    elif "prompt" in row and "completion" in row:
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        full_ids = prompt_ids + completion + [tokenizer.eos_token_id]
    else:
        raise ValueError("each example needs 'messages' or 'prompt' and 'completion'")
    full_ids = list(full_ids)[:max_length]
    n_prompt = min(len(prompt_ids), len(full_ids))
    labels = [IGNORE] * n_prompt + full_ids[n_prompt:]
    return Example(full_ids, labels)


def _batches(examples: list[Example], size: int, pad_id: int, rng: random.Random) -> Iterable:
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order), size):
        chunk = [examples[i] for i in order[start : start + size]]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), IGNORE)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, e in enumerate(chunk):  # right padding: positions stay 0..n-1
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
            mask[row, : len(e.input_ids)] = 1
        yield ids, mask, labels


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def train_adapter(
    vm: VeraModel,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
    init: Adapter | None = None,
) -> tuple[Adapter, list[float]]:
    """Train one adapter on ``rows``; returns it and the mean loss of each epoch."""
    examples = [encode_example(r, tokenizer, config.max_length) for r in rows]
    header = AdapterHeader(
        r=vm.layout.r,
        projection_prng_key=vm.config.projection_prng_key,
        target_modules=vm.config.resolved_targets(getattr(vm.model.config, "model_type", "")),
        base_fingerprint=model_fingerprint(vm.model),
        dtype="float32",
    )
    start = init or Adapter.initial(header, vm.layout, vm.config.d_initial)
    device = vm.bank.rows.device
    rows_param = torch.nn.Parameter(torch.zeros(2, vm.layout.num_params, device=device))
    with torch.no_grad():
        rows_param[1].copy_(start.flat(vm.layout).to(device))
    train_bank = VeraBank(vm.layout, 2, rows=rows_param)
    serving_bank = vm.bank
    vm.replace_bank(train_bank)
    try:
        losses = _fit(vm, rows_param, examples, tokenizer, config, progress)
    finally:
        vm.replace_bank(serving_bank)
    flat = rows_param[1].detach().float().cpu()
    return Adapter.from_flat(header, vm.layout, flat), losses


def _fit(
    vm: VeraModel,
    rows_param: torch.nn.Parameter,
    examples: list[Example],
    tokenizer: Any,
    config: TrainConfig,
    progress: bool,
) -> list[float]:
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    opt = torch.optim.AdamW([rows_param], lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total = steps_per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(total, max(1, int(total * config.warmup_ratio)))
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = rows_param.device
    model = vm.model
    was_training = model.training
    model.train()
    epoch_losses: list[float] = []
    bar = tqdm(total=total, desc="training adapter", disable=not progress)
    try:
        for _ in range(config.epochs):
            seen, loss_sum = 0, 0.0
            for ids, mask, labels in _batches(examples, config.batch_size, pad_id, rng):
                ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
                slots = torch.ones(ids.shape[0], dtype=torch.long, device=device)
                with vm.slots(slots):
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([rows_param], config.grad_clip)
                opt.step()
                sched.step()
                seen += 1
                loss_sum += loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            epoch_losses.append(loss_sum / max(1, seen))
    finally:
        bar.close()
        model.train(was_training)
    return epoch_losses

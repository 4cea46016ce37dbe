"""Fine-tune one user's d and b; base weights and the shared A, B stay frozen.

Examples come from ``vera_core.train_data`` (chat ``messages`` with loss on the last assistant
turn, or ``prompt``/``completion`` pairs with loss on the completion). The same batched VeRA
layers serve and train: a trainer runs the model with its own vector in place of bank slots
(``VeraModel.vector``), so it can share a model that is serving.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from vera_core.adapter import Adapter, AdapterHeader
from vera_core.fingerprint import model_fingerprint
from vera_core.inject import VeraModel
from vera_core.retention import Reference, anchor_kl_sum
from vera_core.train_data import IGNORE, Example


@dataclass(frozen=True)
class TrainConfig:
    """How one adapter is trained. The defaults teach a handful of facts from a few examples
    and do not over-train a large dataset: the schedule is sized in optimizer steps.

    Steps: ``epochs`` passes when given; otherwise ``target_epochs`` passes, but never fewer
    than ``min_steps`` (a 3-example file still gets enough updates) nor more than ``max_steps``.
    Training stops early, as "reproduced", once every example's completion tokens each got
    probability >= ``reproduce_prob`` in the example's latest forward (so greedy decoding
    reproduces every example; read from the training forward itself, no extra work), or, as
    "converged", once the mean loss of the last pass is below ``converged_loss``. More steps
    only over-fit, and every step moves the model further from what it knew (figures below).

    Measured on SmolLM2-135M-Instruct, r=256 on q/v, fp32 and bf16 alike: 3 facts x 1 example
    converge in 11 steps and 5 facts x 1-3 phrasings (11 examples) in 18-19 (3 seeds), every
    trained question then answered with its fact. lr 5e-2 needs ~1.5x the steps; 2e-1 missed a
    trained question; ``min_steps`` 30..100 and batch 4 converge alike. Weight decay keeps the
    adapter from pulling unrelated questions to its facts: at 0.5 (decoupled, so ~5% of d and
    b per step at the peak lr) 3-4 of 7 general questions keep their right answer instead of
    0-2, with the same steps and recall; at 1.0 paraphrases of the facts are recalled less.

    The anchor (``vera_core.retention``: KL to the base model's own answers on general prompts)
    keeps general answers, at a price in tokens. 3 users x 5 facts (13 examples each), the
    default model, q/v, fp32, retention on the 20 probe questions the base answers right, all
    stopped by reproduction: no anchor 30-55% (16-17 steps, ~6,300 tokens); weight 1 x 8
    answers per step 78% (20.7 steps, 17,700 tokens, 87% of paraphrases); weight 1 x 4 78%
    (21.7 steps, 13,400 tokens, 87%): the default. Stopped by the loss bound instead, 1 x 8 ran
    55 steps for 70% and 57% of paraphrases: with the facts learned, further steps trade them
    against the anchor. On one fact, weight 4 x 8 for 60 steps kept 95%.
    """

    lr: float = 1e-1  # VeRA's vectors want far higher rates than LoRA (paper: 1e-3 .. 1e-1)
    batch_size: int = 8  # examples per optimizer step (the whole set when it is smaller)
    epochs: int | None = None  # fixed number of passes; None: sized by the step rules
    target_epochs: int = 3
    min_steps: int = 60  # the schedule of a few examples; they converge well before its end
    max_steps: int = 1000
    converged_loss: float = 0.02  # 0 disables this early stop
    reproduce_prob: float = 0.5  # 0 disables this early stop
    weight_decay: float = 0.5  # keeps the vectors small: fewer general answers changed
    warmup_ratio: float = 0.06
    micro_batch_tokens: int = 2048  # padded tokens per forward/backward; more accumulate
    seed: int = 0
    grad_clip: float = 1.0
    # KL to the base model's own answers on general prompts (vera_core.retention), added to
    # each step's loss with this weight; 0 (or no anchor given to the trainer) turns it off
    anchor_weight: float = 1.0
    anchor_batch: int = 4  # anchor answers per optimizer step

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.micro_batch_tokens <= 0:
            raise ValueError("batch_size and micro_batch_tokens must be > 0")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError("epochs must be > 0 (or None for the step-sized schedule)")
        if not 0 < self.min_steps <= self.max_steps or self.target_epochs <= 0:
            raise ValueError("need 0 < min_steps <= max_steps and target_epochs > 0")
        if not 0 < self.lr < 10:
            raise ValueError(f"lr {self.lr} out of range (0, 10)")
        if not 0 <= self.reproduce_prob < 1:
            raise ValueError("reproduce_prob must be in [0, 1)")
        if self.anchor_weight < 0 or self.anchor_batch <= 0:
            raise ValueError("need anchor_weight >= 0 and anchor_batch > 0")

    def total_steps(self, num_examples: int) -> int:
        per_epoch = math.ceil(num_examples / min(self.batch_size, num_examples))
        if self.epochs is not None:
            return per_epoch * self.epochs
        return max(self.min_steps, min(self.max_steps, per_epoch * self.target_epochs))


def _pad(chunk: list[Example], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and labels [len(chunk), width] (positions 0..n-1)."""
    width = max(len(e.input_ids) for e in chunk)
    ids = torch.full((len(chunk), width), pad_id)
    labels = torch.full((len(chunk), width), IGNORE)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, e in enumerate(chunk):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    return ids, mask, labels


class _Sequence(Protocol):
    @property
    def input_ids(self) -> list[int]: ...


S = TypeVar("S", bound=_Sequence)


def _take(pending: list[S], max_tokens: int) -> list[S]:
    """Pop the longest examples of ``pending`` (sorted by length) that fit ``max_tokens`` padded
    tokens together; at least one."""
    width = len(pending[-1].input_ids)
    n = max(1, min(len(pending), max_tokens // max(1, width)))
    chunk = pending[-n:]
    del pending[-n:]
    return chunk


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


@dataclass(frozen=True)
class StepReport:
    step: int  # optimizer steps done, 1-based
    total_steps: int
    loss: float  # mean token loss of this step's batch
    lr: float
    tokens: int  # tokens (prompt + completion, no padding) this step read
    anchor_kl: float | None = None  # mean KL to the base per anchor answer token, if anchored


@dataclass(frozen=True)
class TrainReport:
    """What a training run did, for logs, job events and the CLI."""

    examples: int
    steps: int
    total_steps: int  # the schedule; ``steps`` is smaller when training converged early
    epochs: float  # passes over the data actually made
    first_loss: float
    final_loss: float  # mean loss of the last pass over the data
    stop_reason: str  # "reproduced" | "converged" | "schedule complete"
    trained_tokens: int
    seconds: float
    losses: tuple[float, ...]  # every step's loss
    anchor_kl: float | None = None  # the last step's mean KL to the base, if anchored

    def summary(self) -> str:
        kl = "" if self.anchor_kl is None else f", KL to base {self.anchor_kl:.4f}"
        return (
            f"{self.steps}/{self.total_steps} steps ({self.epochs:.1f} epochs over "
            f"{self.examples} examples), loss {self.first_loss:.3f} -> {self.final_loss:.4f}"
            f"{kl}, {self.stop_reason}, {self.trained_tokens} tokens in {self.seconds:.1f} s"
        )


def adapter_header(vm: VeraModel) -> AdapterHeader:
    """The header of an adapter trained on ``vm`` (its r, key, targets and base model)."""
    return AdapterHeader(
        r=vm.layout.r,
        projection_prng_key=vm.config.projection_prng_key,
        target_modules=vm.config.resolved_targets(getattr(vm.model.config, "model_type", "")),
        base_fingerprint=model_fingerprint(vm.model),
        dtype="float32",
    )


class AdapterTrainer:
    """Trains one adapter's flat vector [num_params] through ``vm``'s serving layers.

    Nothing shared is modified: the bank, the model's train/eval mode and the base weights'
    ``.grad`` stay as they are (gradients are taken for the vector only), so a server can run
    a trainer between its own forwards. Work comes in ``micro_step`` units (one forward and
    backward of at most ``micro_batch_tokens`` tokens), so a caller decides how to interleave.
    """

    def __init__(
        self,
        vm: VeraModel,
        tokenizer: Any,
        examples: list[Example],
        config: TrainConfig = TrainConfig(),
        init: Adapter | None = None,
        anchor: list[Reference] | None = None,
    ) -> None:
        """``anchor``: the base model's answers to keep (``vera_core.retention``); each
        optimizer step also takes ``anchor_batch`` of them with weight ``anchor_weight``."""
        if not examples:
            raise ValueError("no training examples")
        if not any(lab != IGNORE for e in examples for lab in e.labels[1:]):
            raise ValueError("no example has a completion token to learn from")
        self.vm, self.config, self.examples = vm, config, examples
        self.header = adapter_header(vm)
        start = init or Adapter.initial(self.header, vm.layout, vm.config.d_initial)
        self.device = vm.projections.A.device
        self.vector = start.flat(vm.layout).to(self.device, torch.float32).requires_grad_(True)
        self._grad = torch.zeros_like(self.vector)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.batch_size = min(config.batch_size, len(examples))
        self.steps_per_epoch = math.ceil(len(examples) / self.batch_size)
        self.total_steps = config.total_steps(len(examples))
        self.opt = torch.optim.AdamW([self.vector], lr=config.lr, weight_decay=config.weight_decay)
        warmup = max(1, int(self.total_steps * config.warmup_ratio))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, _lr_lambda(self.total_steps, warmup)
        )
        self._rng = random.Random(config.seed)
        self._order: list[int] = []
        self._pending: list[Example] = []  # examples of the current step not yet run, by length
        self.anchor = anchor if anchor and config.anchor_weight > 0 else []
        self._anchor_order: list[int] = []
        self._anchor_pending: list[Reference] = []  # this step's anchor answers not yet run
        self._anchor_tokens = 0  # anchor answer tokens of the current step
        self._step_kl = 0.0
        self.last_anchor_kl: float | None = None
        self._step_tokens = self._step_label_tokens = 0
        self._step_loss = 0.0
        # id(example) -> whether its latest forward gave every completion token >= reproduce_prob
        self._reproduced: dict[int, bool] = {}
        self._distinct = len({id(e) for e in examples})  # entries _reproduced ends up with
        self.step = 0
        self.trained_tokens = 0
        self.losses: list[float] = []
        self.stop_reason: str | None = None
        self._started = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def micro_step(self, max_tokens: int | None = None) -> StepReport | None:
        """One forward + backward of at most ``max_tokens`` padded tokens (default
        ``micro_batch_tokens``; one example at least); returns the report when it completed an
        optimizer step. The budget may change from call to call (a server shrinks it while
        requests wait); the step's gradient is the same."""
        if self.done:
            raise RuntimeError("training is finished")
        if not self._pending and not self._anchor_pending:
            self._pending = sorted(self._next_batch(), key=lambda e: len(e.input_ids))
            self._step_label_tokens = sum(
                sum(lab != IGNORE for lab in e.labels[1:]) for e in self._pending
            )
            self._anchor_pending = sorted(self._next_anchor(), key=lambda r: len(r.input_ids))
            self._anchor_tokens = sum(len(r.answer_ids) for r in self._anchor_pending)
        budget = max_tokens or self.config.micro_batch_tokens
        if self._pending:
            chunk = _take(self._pending, budget)
            loss_sum, tokens = self._forward_backward(chunk, self._step_label_tokens)
            self._step_loss += loss_sum
        else:
            refs = _take(self._anchor_pending, budget)
            kl_sum, tokens = self._anchor_backward(refs)
            self._step_kl += kl_sum
        self._step_tokens += tokens
        if self._pending or self._anchor_pending:
            return None
        return self._optimizer_step()

    def run(self, on_step: Callable[[StepReport], None] | None = None) -> TrainReport:
        """Train to the end of the schedule (or convergence) in this thread."""
        while not self.done:
            report = self.micro_step()
            if report is not None and on_step is not None:
                on_step(report)
        return self.report()

    @torch.no_grad()
    def evaluate(self, examples: list[Example]) -> float:
        """Mean token loss of ``examples`` with the current vector."""
        total, count = 0.0, 0
        pending = sorted(examples, key=lambda e: len(e.input_ids))
        while pending:
            chunk = _take(pending, self.config.micro_batch_tokens)
            ids, mask, labels = (t.to(self.device) for t in _pad(chunk, self.pad_id))
            with self.vm.vector(self.vector.detach(), ids.shape[0]):
                logits = self.vm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            total += float(_token_loss_sum(logits, labels))
            count += int((labels[:, 1:] != IGNORE).sum())
        return total / max(1, count)

    def adapter(self) -> Adapter:
        return Adapter.from_flat(self.header, self.vm.layout, self.vector.detach().float().cpu())

    def report(self) -> TrainReport:
        window = self.losses[-self.steps_per_epoch :] or [float("nan")]
        return TrainReport(
            examples=len(self.examples),
            steps=self.step,
            total_steps=self.total_steps,
            epochs=self.step * self.batch_size / len(self.examples),
            first_loss=self.losses[0] if self.losses else float("nan"),
            final_loss=sum(window) / len(window),
            stop_reason=self.stop_reason or "not finished",
            trained_tokens=self.trained_tokens,
            seconds=time.perf_counter() - self._started,
            losses=tuple(self.losses),
            anchor_kl=self.last_anchor_kl,
        )

    # -- internals --------------------------------------------------------------------------
    def _next_batch(self) -> list[Example]:
        batch: list[Example] = []
        while len(batch) < self.batch_size:
            if not self._order:  # a new pass over the data, shuffled
                self._order = list(range(len(self.examples)))
                self._rng.shuffle(self._order)
            batch.append(self.examples[self._order.pop()])
        return batch

    def _next_anchor(self) -> list[Reference]:
        batch: list[Reference] = []
        while self.anchor and len(batch) < min(self.config.anchor_batch, len(self.anchor)):
            if not self._anchor_order:
                self._anchor_order = list(range(len(self.anchor)))
                self._rng.shuffle(self._anchor_order)
            batch.append(self.anchor[self._anchor_order.pop()])
        return batch

    def _anchor_backward(self, refs: list[Reference]) -> tuple[float, int]:
        """Add this chunk's share of ``anchor_weight`` x the step's mean KL per anchor answer
        token to ``_grad``; returns the summed KL and tokens read."""
        ids = torch.full((len(refs), max(len(r.input_ids) for r in refs)), self.pad_id)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(refs):
            ids[row, : len(r.input_ids)] = torch.tensor(r.input_ids)
            mask[row, : len(r.input_ids)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.enable_grad(), self.vm.vector(self.vector, ids.shape[0]):
            logits = self.vm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            kl_sum = anchor_kl_sum(logits, refs)
            scale = self.config.anchor_weight / max(1, self._anchor_tokens)
            (grad,) = torch.autograd.grad(kl_sum * scale, [self.vector])
        self._grad += grad
        return float(kl_sum.detach()), int(mask.sum())

    def _forward_backward(self, chunk: list[Example], label_tokens: int) -> tuple[float, int]:
        """Add this micro-batch's share of the step's mean-token-loss gradient to ``_grad``."""
        ids, mask, labels = (t.to(self.device) for t in _pad(chunk, self.pad_id))
        with torch.enable_grad(), self.vm.vector(self.vector, ids.shape[0]):
            logits = self.vm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss_sum = _token_loss_sum(logits, labels)
            # grad of the vector only: base weights get no .grad even if they require one
            (grad,) = torch.autograd.grad(loss_sum / max(1, label_tokens), [self.vector])
        self._grad += grad
        if self.config.reproduce_prob > 0:
            rows = reproduced_rows(logits.detach(), labels, math.log(self.config.reproduce_prob))
            self._reproduced.update(zip(map(id, chunk), rows))
        return float(loss_sum.detach()), int(mask.sum())

    def _optimizer_step(self) -> StepReport:
        self.vector.grad = self._grad
        torch.nn.utils.clip_grad_norm_([self.vector], self.config.grad_clip)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.vector.grad = None
        self._grad = torch.zeros_like(self.vector)
        loss = self._step_loss / max(1, self._step_label_tokens)
        kl = self._step_kl / self._anchor_tokens if self._anchor_tokens else None
        self.last_anchor_kl = kl
        tokens = self._step_tokens
        self._step_loss, self._step_tokens, self._step_kl = 0.0, 0, 0.0
        self.step += 1
        self.trained_tokens += tokens
        self.losses.append(loss)
        self._maybe_stop()
        return StepReport(self.step, self.total_steps, loss, lr, tokens, kl)

    def _maybe_stop(self) -> None:
        if self.step >= self.total_steps:
            self.stop_reason = "schedule complete"
            return
        reproduced = self._reproduced.values()
        if len(reproduced) == self._distinct and all(reproduced):
            self.stop_reason = "reproduced"
            return
        window = self.losses[-self.steps_per_epoch :]
        converged = self.config.converged_loss > 0 and len(self.losses) >= self.steps_per_epoch
        if converged and sum(window) / len(window) < self.config.converged_loss:
            self.stop_reason = "converged"


def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions; logits [b, s, vocab]."""
    vocab = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, vocab),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def reproduced_rows(logits: torch.Tensor, labels: torch.Tensor, min_logp: float) -> list[bool]:
    """Per row of logits [b, s, vocab] / labels [b, s]: every labelled next token has
    log-probability >= ``min_logp`` (>= log 0.5 makes it the greedy choice)."""
    targets = labels[:, 1:]  # [b, s-1]
    at = targets != IGNORE
    scored = logits[:, :-1][at].float()  # [n, vocab]: labelled positions only
    logp = scored.gather(-1, targets[at].unsqueeze(-1)).squeeze(-1) - scored.logsumexp(-1)
    low = torch.zeros_like(targets, dtype=torch.bool)
    low[at] = logp < min_logp
    return (~low.any(dim=-1)).tolist()


def train_adapter(
    vm: VeraModel,
    tokenizer: Any,
    examples: list[Example],
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
    init: Adapter | None = None,
    anchor: list[Reference] | None = None,
) -> tuple[Adapter, TrainReport]:
    """Train one adapter on ``examples`` in this thread; returns it and what training did."""
    trainer = AdapterTrainer(vm, tokenizer, examples, config, init, anchor)
    bar = tqdm(total=trainer.total_steps, desc="training adapter", disable=not progress)

    def show(step: StepReport) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{step.loss:.3f}")

    try:
        report = trainer.run(show)
    finally:
        bar.close()
    return trainer.adapter(), report

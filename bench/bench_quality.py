"""Quality: do a few trained facts stick, stay with their user, and leave the rest alone?

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_quality.py --out quality.json
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_quality.py --quick      # 3 users, smoke run

8 users x 5 invented facts (``bench/quality_data.py``), each user trained on its own file with
``TrainConfig()`` as it is, by two methods:

* VeRA (ours): ``train_adapter`` on the server's r and targets; then every user's adapter is
  put in a store and all users' questions go to one offline ``Engine`` at once, mixed in the
  same batches, as the server serves them.
* LoRA (PEFT, r=8, alpha 16, q_proj/v_proj): the same examples, batches, step schedule
  (warm-up, cosine, clipping, early stop) at ``--lora-lr`` 3e-3, no weight decay. PEFT's
  usual 2e-4 learns nothing in a few dozen steps; of the usual tiny-data range 1e-3..3e-3,
  3e-3 converged fastest and recalled every trained fact on separate small sets in fp32 and
  bf16 (the rule that picked our lr). Served the way LoRA is served without a multi-LoRA
  kernel: each user merged into the weights (one generate per user).

Each user is asked its trained questions, held-out paraphrases and general questions (greedy,
24 new tokens). Columns: recall on trained questions and on paraphrases (the answer contains
the user's value); leaks (answers holding any other user's value); general questions answered
word for word as the base model answers them through the same serving path, and still right
(the base model's right answers that keep their key word); trainable parameters and adapter
file bytes per user; training seconds per user (mean; the machine may be shared).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_decode import load_bench_model
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from quality_data import (
    CONTINUAL,
    GENERAL,
    USERS,
    Question,
    continual_rows,
    facts_of,
    questions,
    training_rows,
)
from safetensors.torch import save as safetensors_bytes

from adapters_store import AdapterStore
from server.config import ServerConfig, vera_home
from server.engine import Engine, EngineConfig, SamplingParams, SchedulerConfig, SlotPool
from server.finetune.references import anchor_references
from vera_core import VeraConfig, inject_vera, model_fingerprint
from vera_core.adapter_file import adapter_to_bytes
from vera_core.retention import Reference, anchor_kl_sum
from vera_core.train import (  # LoRA trains as ours does
    TrainConfig,
    _lr_lambda,
    _pad,
    _token_loss_sum,
    reproduced_rows,
    train_adapter,
)
from vera_core.train_data import IGNORE, DataLimits, examples_of

LIMITS = DataLimits.offline(2048)

NEW_TOKENS = 24
LORA = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def chat_ids(tok, text: str) -> list[int]:
    return tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
    )


def all_questions(user: str) -> list[Question]:
    general = [Question(user, q, key, held_out=False) for q, key in GENERAL]
    return questions(user) + general


# -- VeRA: our trainer, served together by the engine --------------------------------------------
def run_vera(
    model, tok, users: list[str], server: ServerConfig, anchor: list[Reference], weight: float
) -> dict:
    vera = VeraConfig(
        r=server.r, projection_prng_key=server.projection_prng_key, target_modules=server.targets
    )
    vm = inject_vera(model, vera, num_slots=len(users) + 1)
    config = TrainConfig(anchor_weight=weight)
    adapters, seconds, steps = {}, [], []
    for user in users:
        t0 = time.perf_counter()
        examples = examples_of(training_rows(user), tok, LIMITS)
        adapters[user], report = train_adapter(
            vm, tok, examples, config, progress=False, anchor=anchor
        )
        seconds.append(time.perf_counter() - t0)
        steps.append(report.steps)
        print(f"vera {user:6s} {report.summary()}", flush=True)
    return serve_vera(vm, tok, adapters, server, users, seconds, steps)


def serve_vera(vm, tok, adapters: dict, server: ServerConfig, users, seconds, steps) -> dict:
    """Every user's adapter in one store, all questions to one offline engine at once."""
    with tempfile.TemporaryDirectory() as tmp:
        store = AdapterStore(
            Path(tmp), vm.layout, server.projection_prng_key, model_fingerprint(vm.model)
        )
        for user, adapter in adapters.items():
            store.put(user, adapter)
        pool = SlotPool(vm.bank, store, host_capacity=len(users) + 1)
        scheduler = SchedulerConfig(server.max_batch, server.max_prefill_tokens)
        engine = Engine(vm, tok, pool, EngineConfig(scheduler))
        engine.start()
        try:
            answers = ask_engine(engine, tok, users)
        finally:
            engine.stop()
            pool.close()
            store.close()
    one = next(iter(adapters.values()))
    return {
        "answers": answers,
        "params": vm.layout.num_params,
        "bytes": len(adapter_to_bytes(one)),
        "train_s": seconds,
        "steps": steps,
    }


def run_continual(model, tok, server: ServerConfig, anchor: list[Reference]) -> dict:
    """One user, three jobs of five facts in sequence, each continuing from the last adapter
    and replaying the earlier files (what a job on the user's fine-tuned model does)."""
    vera = VeraConfig(
        r=server.r, projection_prng_key=server.projection_prng_key, target_modules=server.targets
    )
    vm = inject_vera(model, vera, num_slots=2)
    adapter, rows, seconds, steps = None, [], 0.0, 0
    for job in range(len(CONTINUAL)):
        rows = continual_rows(job) + rows  # new facts first, then everything replayed
        t0 = time.perf_counter()
        examples = examples_of(rows, tok, LIMITS)
        adapter, report = train_adapter(
            vm, tok, examples, TrainConfig(), progress=False, init=adapter, anchor=anchor
        )
        seconds += time.perf_counter() - t0
        steps += report.steps
        print(f"continual job {job + 1}: {report.summary()}", flush=True)
    result = serve_vera(vm, tok, {"ana": adapter}, server, [], [seconds], [steps])
    return result


def continual_questions() -> list[Question]:
    return [Question("ana", q, fact, False) for job in CONTINUAL for _, qs, fact in job for q in qs]


def ask_engine(engine: Engine, tok, users: list[str]) -> dict:
    """Every user's questions plus the base model's general answers, all submitted at once;
    with no users, the continual user's questions."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    keys = [(u, q.text) for u in users for q in all_questions(u)]
    if not users:
        keys = [("ana", q.text) for q in continual_questions()]
        keys += [("ana", q) for q, _ in GENERAL]
    keys += [(None, q) for q, _ in GENERAL]
    out = engine.generate([(u, chat_ids(tok, text), params) for u, text in keys])
    return {f"{u}|{text}": r["text"] for (u, text), r in zip(keys, out)}


# -- LoRA: the same schedule, served merged -------------------------------------------------------
def batches(examples: list, batch_size: int, seed: int):
    """Batches in the trainer's order: shuffled passes, drawn across pass boundaries."""
    rng, order = random.Random(seed), []
    while True:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch.append(examples[order.pop()])
        yield batch


def train_lora(
    base, tok, user: str, lr: float, anchor: list[Reference], weight: float, lora: LoraConfig
):
    """PEFT LoRA on the user's file with TrainConfig()'s batches, schedule and early stop; the
    optimizer is AdamW at ``lr`` without weight decay (PEFT's and HF Trainer's usual); with
    ``weight`` > 0 the trainer's KL to the base model's answers, ``anchor_batch`` per step."""
    cfg = TrainConfig()
    pm = get_peft_model(copy.deepcopy(base), lora)
    params = [p for p in pm.parameters() if p.requires_grad]
    examples = examples_of(training_rows(user), tok, LIMITS)
    batch_size = min(cfg.batch_size, len(examples))
    per_pass = -(-len(examples) // batch_size)
    total = cfg.total_steps(len(examples))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, int(total * cfg.warmup_ratio))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warmup))
    losses: list[float] = []
    reproduced: dict[int, bool] = {}  # the trainer's stop: every example reproduced
    bound = math.log(cfg.reproduce_prob)
    pm.train()
    anchored = batches(anchor, min(cfg.anchor_batch, len(anchor)), cfg.seed) if weight else None
    for batch in batches(examples, batch_size, cfg.seed):
        ids, mask, labels = _pad(batch, tok.pad_token_id)
        logits = pm(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = _token_loss_sum(logits, labels) / int((labels[:, 1:] != IGNORE).sum())
        loss.backward()
        reproduced.update(zip(map(id, batch), reproduced_rows(logits.detach(), labels, bound)))
        if anchored is not None:
            refs = next(anchored)
            width = max(len(r.input_ids) for r in refs)
            a_ids = torch.tensor([r.input_ids + [0] * (width - len(r.input_ids)) for r in refs])
            a_mask = torch.tensor(
                [[1] * len(r.input_ids) + [0] * (width - len(r.input_ids)) for r in refs]
            )
            a_logits = pm(input_ids=a_ids, attention_mask=a_mask, use_cache=False).logits
            tokens = sum(len(r.answer_ids) for r in refs)
            (weight * anchor_kl_sum(a_logits, refs) / tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        window = losses[-per_pass:]
        converged = len(losses) >= per_pass and sum(window) / len(window) < cfg.converged_loss
        every = len(reproduced) == len(examples) and all(reproduced.values())
        if every or converged or len(losses) == total:
            break
    pm.eval()
    size = len(safetensors_bytes(get_peft_model_state_dict(pm)))
    return pm.merge_and_unload(), len(losses), sum(p.numel() for p in params), size


@torch.inference_mode()
def generate(model, tok, texts: list[str]) -> list[str]:
    """Greedy answers of ``model`` to ``texts``, one left-padded batch."""
    tok.padding_side = "left"
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
        )
        for t in texts
    ]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
    )
    return [tok.decode(o[enc["input_ids"].shape[1] :], skip_special_tokens=True) for o in out]


def run_lora(
    base, tok, users: list[str], lr: float, anchor: list[Reference], weight: float, lora: LoraConfig
) -> dict:
    answers, seconds, steps = {}, [], []
    general = [q for q, _ in GENERAL]
    answers.update({f"None|{q}": a for q, a in zip(general, generate(base, tok, general))})
    for user in users:
        t0 = time.perf_counter()
        merged, n_steps, n_params, size = train_lora(base, tok, user, lr, anchor, weight, lora)
        seconds.append(time.perf_counter() - t0)
        steps.append(n_steps)
        print(f"lora {user:6s} {n_steps} steps in {seconds[-1]:.1f} s", flush=True)
        texts = [q.text for q in all_questions(user)]
        answers.update({f"{user}|{t}": a for t, a in zip(texts, generate(merged, tok, texts))})
        del merged
    return {
        "answers": answers,
        "params": n_params,
        "bytes": size,
        "train_s": seconds,
        "steps": steps,
    }


# -- scoring ------------------------------------------------------------------------------------
def score(result: dict, users: list[str]) -> dict:
    answers = result["answers"]
    trained, held, leaks, same, right, right_base = [], [], 0, 0, 0, 0
    for user in users:
        others = [f for u in USERS if u != user for f in facts_of(u)]
        asked = continual_questions() if user == "continual" else questions(user)
        if user == "continual":
            others, user = [], "ana"
        for q in asked:
            text = answers[f"{user}|{q.text}"]
            (held if q.held_out else trained).append(q.fact in text)
            leaks += any(f in text for f in others)
        for q, key in GENERAL:
            text, base = answers[f"{user}|{q}"], answers[f"None|{q}"]
            leaks += any(f in text for f in others)
            same += text == base
            if key in base:
                right_base += 1
                right += key in text
    return {
        "trained_recall": sum(trained) / len(trained),
        "paraphrase_recall": sum(held) / len(held) if held else float("nan"),
        "leaks": leaks,
        "general_same": same / (len(users) * len(GENERAL)),
        "general_right": right / max(1, right_base),
        "base_right": right_base,
        "params": result["params"],
        "bytes": result["bytes"],
        "train_s_mean": statistics.mean(result["train_s"]),
        "steps_mean": statistics.mean(result["steps"]),
    }


def table(scores: dict[str, dict], users: int, dtype: str) -> str:
    head = (
        f"| method ({users} users x 5 facts, {dtype}) | trained recall | paraphrase recall | "
        "leaks | general same as base | retention: general still right | "
        "trainable params / user | "
        "bytes / user | steps | train s / user |\n|---|---|---|---|---|---|---|---|---|---|"
    )

    def share(x: float) -> str:  # nan: nothing asked (the continual user has no paraphrases)
        return "–" if math.isnan(x) else f"{x:.1%}"

    rows = [
        f"| {name} | {share(s['trained_recall'])} | {share(s['paraphrase_recall'])} | "
        f"{s['leaks']} | "
        f"{s['general_same']:.0%} | {s['general_right']:.0%} | {s['params']:,} | "
        f"{s['bytes'] / 1024:.0f} KiB | {s['steps_mean']:.0f} | {s['train_s_mean']:.1f} |"
        for name, s in scores.items()
    ]
    return "\n".join([head, *rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    server = ServerConfig()
    parser.add_argument("--dtype", default=str(server.torch_dtype).removeprefix("torch."))
    parser.add_argument("--users", type=int, default=len(USERS), help=f"1..{len(USERS)}")
    parser.add_argument("--quick", action="store_true", help="3 users (a smoke run)")
    parser.add_argument(
        "--methods",
        default="vera,vera-plain,lora,lora-anchor,continual",
        help="vera / lora: with the trainer's default KL to the base model's answers "
        "(lora-anchor) or without (vera-plain / lora); continual: 3 VeRA jobs x 5 facts; "
        "a method@targets (e.g. vera@all-linear, lora@q_proj+v_proj+o_proj) overrides "
        "--target-modules for that row",
    )
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument(
        "--target-modules",
        default=server.target_modules,
        help="VeRA targets, as the server's flag (e.g. all-linear); empty: q_proj,v_proj",
    )
    parser.add_argument("--out", type=Path, help="write the scores and every answer as JSON")
    args = parser.parse_args()
    users = list(USERS)[: 3 if args.quick else args.users]
    results, scores = {}, {}
    weight = TrainConfig().anchor_weight
    anchor: list[Reference] = []
    for spec in args.methods.split(","):
        method, _, at = spec.partition("@")  # "vera@all-linear", "lora@q_proj+v_proj+o_proj"
        server = dataclasses.replace(
            server, target_modules=at.replace("+", ",") if at else args.target_modules
        )
        where = ",".join(server.targets) or "q,v"
        model, tok, _ = load_bench_model(args.dtype)
        if not anchor:
            t0 = time.perf_counter()
            anchor = anchor_references(model, tok, vera_home() / "references")
            print(f"anchor: {len(anchor)} base answers in {time.perf_counter() - t0:.1f} s")
        asked = users
        if method in ("vera", "vera-plain"):
            w = weight if method == "vera" else 0.0
            results[spec] = run_vera(model, tok, users, server, anchor, w)
            name = f"VeRA r={server.r} {where} (ours, lr {TrainConfig().lr:g}, KL weight {w:g})"
        elif method in ("lora", "lora-anchor"):
            w = weight if method == "lora-anchor" else 0.0
            targets: str | list[str] = list(server.targets) or ["q_proj", "v_proj"]
            if targets == ["all-linear"]:
                targets = "all-linear"  # PEFT's own reading: every linear layer but the head
            lora = dataclasses.replace(LORA, target_modules=targets)
            results[spec] = run_lora(model, tok, users, args.lora_lr, anchor, w, lora)
            name = f"LoRA r=8 {where} (PEFT, lr {args.lora_lr:g}, KL weight {w:g}, merged)"
        elif method == "continual":
            results[spec] = run_continual(model, tok, server, anchor)
            name = f"VeRA {where} continual: 3 jobs x 5 facts, 1 user, KL weight {weight:g}"
            asked = ["continual"]
        else:
            parser.error(f"unknown method {method!r}")
        scores[name] = score(results[spec], asked)
        print(table({name: scores[name]}, len(users), args.dtype), flush=True)  # as it comes
    print(table(scores, len(users), args.dtype))
    if args.out:
        args.out.write_text(json.dumps({"scores": scores, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

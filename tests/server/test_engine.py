"""The engine on tiny random models: continuous batching with per-row adapters gives, for every
request, exactly the greedy tokens of transformers' ``generate`` on the merged model."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pytest
import torch
from slots_kit import wait_host

from adapters_store import AdapterStore
from server.engine import (
    ContextTooLong,
    Engine,
    EngineConfig,
    QueueFull,
    SamplingParams,
    SlotPool,
)
from server.engine.scheduler import SchedulerConfig
from server.engine.steps import DecodeForward, MixedForward
from vera_core import Adapter, AdapterHeader, VeraConfig, inject_vera, model_fingerprint
from vera_core.merge import merge, unmerge

# bench/gpu_check.sh runs the compiled cases on CUDA (VERA_TEST_DEVICE=cuda)
DEVICE = torch.device(os.environ.get("VERA_TEST_DEVICE", "cpu"))


class IdTokenizer:
    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def random_adapter(vm, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    header = AdapterHeader(vm.layout.r, 0, ("x",), model_fingerprint(vm.model))
    return Adapter(
        header,
        {
            s.name: (
                torch.randn(vm.layout.r, generator=g),
                torch.randn(s.out_features, generator=g),
            )
            for s in vm.layout.layers
        },
    )


def reference(vm, adapter, prompt: list[int], n: int) -> list[int]:
    if adapter is not None:
        merge(vm, adapter)
    try:
        with torch.no_grad():
            out = vm.model.generate(
                torch.tensor([prompt], device=DEVICE),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
    finally:
        unmerge(vm)
    return out[0, len(prompt) :].tolist()


def build(
    make_tiny,
    kind: str,
    tmp_path,
    max_batch: int = 4,
    max_waiting: int = 64,
    max_prefill_tokens: int = 1024,
    compile: str = "off",
    static_decode: bool = False,
    **targets,
):
    model = make_tiny(kind).to(DEVICE)
    model.generation_config.eos_token_id = None
    vm = inject_vera(model, VeraConfig(r=8, **targets), num_slots=4)
    store = AdapterStore(tmp_path / "store", vm.layout, 0, model_fingerprint(model))
    pool = SlotPool(vm.bank, store, host_capacity=8)
    cfg = EngineConfig(
        SchedulerConfig(
            max_batch=max_batch, max_waiting=max_waiting, max_prefill_tokens=max_prefill_tokens
        ),
        max_seq_len=96,
        compile=compile,
        static_decode=static_decode,
    )
    return vm, store, Engine(vm, IdTokenizer(), pool, cfg)


@contextlib.contextmanager
def forward_tokens(vm) -> Iterator[list[int]]:
    """The tokens of every model forward inside the block (prompt chunks and decode rows)."""
    seen: list[int] = []

    def spy(_module, _args, kwargs) -> None:
        seen.append(int(kwargs["input_ids"].numel()))

    hook = vm.model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


_COMPILE = pytest.mark.skipif(
    os.environ.get("VERA_TEST_COMPILE") != "1", reason="VERA_TEST_COMPILE=1 runs it"
)


@pytest.mark.parametrize(
    "kind,targets,chunk,mode",
    [
        ("llama", {}, 1024, "eager"),
        ("llama", {"target_modules": ("all-linear",)}, 1024, "eager"),
        ("gpt2", {}, 1024, "eager"),
        ("llama", {}, 5, "eager"),  # chunked prefill: prompts span steps, others decode meanwhile
        ("gpt2", {}, 7, "eager"),
        # static decode shapes (what CUDA graphs replay): batches padded to a row bucket, KV
        # columns to a length bucket, pad rows writing a scratch column; rows interleaved with
        # prompts still prefilling (chunk 5) take the gather path with pad rows too
        ("llama", {}, 1024, "static"),
        ("llama", {}, 5, "static"),
        ("gpt2", {"target_modules": ("all-linear",)}, 7, "static"),
        # --compile on: the decode forward through inductor (on CUDA: static shapes in CUDA
        # graphs). Compiling takes minutes on 2 cores and the flag is off on CPU, so these run
        # where asked for (VERA_TEST_COMPILE=1; bench/gpu_check.sh sets it on CUDA)
        pytest.param("llama", {}, 1024, "compiled", marks=_COMPILE, id="llama-compiled"),
        pytest.param("llama", {}, 5, "compiled-static", marks=_COMPILE, id="llama-compiled-static"),
    ],
)
def test_mixed_users_join_and_leave_exact(make_tiny, tmp_path, kind, targets, chunk, mode) -> None:
    vm, store, engine = build(
        make_tiny,
        kind,
        tmp_path,
        max_prefill_tokens=chunk,
        compile="startup" if mode.startswith("compiled") else "off",
        static_decode=mode.endswith("static"),
        **targets,
    )
    if engine.runner.compiled:
        engine.warm_up()
    decode_shapes = set()  # (batch, kv columns) of every decode forward
    mixed = []  # (decode rows, chunks) of every forward that prefilled and decoded at once

    def spy(_module, _args, kwargs) -> None:
        step = vm.forwards.current
        if isinstance(step, DecodeForward):
            decode_shapes.add((kwargs["input_ids"].shape[0], kwargs["attention_mask"].shape[-1]))
        if isinstance(step, MixedForward):
            mixed.append((step.decode_rows, len(step.chunks)))

    hook = vm.model.register_forward_pre_hook(spy, with_kwargs=True)
    users = {f"user{i}": random_adapter(vm, i) for i in range(5)}  # more users than slots
    for uid, a in users.items():
        store.put(uid, a)
    g = torch.Generator().manual_seed(0)
    jobs = []
    for i in range(10):
        uid = None if i % 4 == 3 else f"user{i % 5}"
        prompt = torch.randint(
            3, 120, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g
        ).tolist()
        jobs.append((uid, prompt, SamplingParams(max_new_tokens=3 + (i * 7) % 13)))
    engine.start()
    try:
        first = [engine.submit(*job) for job in jobs[:5]]
        time.sleep(0.05)  # the rest join a running batch
        rest = [engine.submit(*job) for job in jobs[5:]]
        results = []
        for seq in first + rest:
            while (ev := seq.channel.get_sync(timeout=120)).finish_reason is None:
                pass
            assert ev.finish_reason == "length", ev
            results.append(list(seq.output_ids))
    finally:
        engine.stop()
        hook.remove()
    for (uid, prompt, params), got in zip(jobs, results):
        want = reference(vm, users.get(uid), prompt, params.max_new_tokens)
        assert got == want, (uid, prompt)
    batches = {b for b, _ in decode_shapes}
    if mode.endswith("static"):  # padded to the row buckets, attending to the length bucket
        assert batches <= {1, 2, 4} and {w for _, w in decode_shapes} == {96}, decode_shapes
        assert not mixed  # prompts and decode rows run as separate forwards
    else:
        assert {1, 2, 3} & batches, decode_shapes  # unpadded: the sizes the batch really had
        # rows joining a running batch prefill in the decode rows' forward (one flat forward)
        assert mixed and all(d > 0 and c > 0 for d, c in mixed), mixed
    if mode.endswith("static"):  # allocated once at full size (4 rows x 97 columns), kept
        kv = engine.runner.kv
        assert [k.shape[0] * k.shape[2] for k in kv.keys] == [4 * 97] * kv.num_layers
    else:
        assert engine.kv_cache_bytes() == 0  # idle: KV freed
    assert engine.pool.stats()["slots_pinned"] == 0


def test_background_compile_serves_eager_then_switches_exact(make_tiny, tmp_path) -> None:
    """--compile background: requests are answered (eager) while another thread compiles the
    decode step on its own KV cache; once warm the engine decodes compiled, tokens exact."""
    vm, store, engine = build(make_tiny, "llama", tmp_path, compile="background")
    users = {f"user{i}": random_adapter(vm, i) for i in range(3)}
    for uid, a in users.items():
        store.put(uid, a)
    jobs = [
        (uid, [5 + i, 17, 3 * i + 1], SamplingParams(max_new_tokens=6))
        for i, uid in enumerate([None, *users])
    ]
    compiler = engine.runner.compiler
    assert compiler is not None
    engine.start()
    try:
        before = engine.generate(jobs)  # served at once, while the compile thread works
        assert compiler.eager_steps > 0
        assert compiler.join(timeout=900), compiler.stats()
        mode = engine.decode_mode()
        assert mode["compiled"] and mode["background_compile"]["state"] == "ready", mode
        after = engine.generate(jobs)
        assert compiler.compiled_steps > 0, compiler.stats()
    finally:
        engine.stop()
    for (uid, prompt, params), a, b in zip(jobs, before, after):
        want = reference(vm, users.get(uid), prompt, params.max_new_tokens)
        assert a["token_ids"] == want and b["token_ids"] == want, uid


def test_limits(make_tiny, tmp_path) -> None:
    vm, _, engine = build(make_tiny, "llama", tmp_path, max_waiting=2)
    with pytest.raises(ContextTooLong, match="exceeds the context limit of 96"):
        engine.submit(None, list(range(90)), SamplingParams(max_new_tokens=10))
    short = SamplingParams(max_new_tokens=4)
    engine.submit(None, [5, 6], short)
    engine.submit(None, [5, 6], short)
    with pytest.raises(QueueFull):  # the engine is not started: nothing leaves the queue
        engine.submit(None, [5, 6], short)


def test_cancel_frees_row_and_slot(make_tiny, tmp_path) -> None:
    vm, store, engine = build(make_tiny, "llama", tmp_path)
    store.put("u", random_adapter(vm, 1))
    engine.start()
    try:
        long = engine.submit("u", [5, 6, 7], SamplingParams(max_new_tokens=80))
        short = engine.submit(None, [8, 9], SamplingParams(max_new_tokens=5))
        assert long.channel.get_sync(timeout=60).finish_reason is None
        long.cancel()
        while (ev := long.channel.get_sync(timeout=60)).finish_reason is None:
            pass
        assert ev.finish_reason == "cancelled"
        while (ev := short.channel.get_sync(timeout=60)).finish_reason is None:
            pass
        assert ev.finish_reason == "length" and len(short.output_ids) == 5
        deadline = time.time() + 10
        while engine.running() and time.time() < deadline:
            time.sleep(0.01)
        assert engine.running() == 0 and engine.pool.stats()["slots_pinned"] == 0
    finally:
        engine.stop()


def test_unknown_adapter_is_refused_at_submit(make_tiny, tmp_path) -> None:
    from adapters_store import AdapterNotFound

    _, _, engine = build(make_tiny, "llama", tmp_path)
    with pytest.raises(AdapterNotFound):
        engine.submit("ghost", [1, 2], SamplingParams(max_new_tokens=4))


def test_nan_in_one_row_fails_only_that_request(make_tiny, tmp_path) -> None:
    """A row whose numbers blow up gets an error; the rest of the batch carries on."""
    vm, store, engine = build(make_tiny, "llama", tmp_path)
    good = random_adapter(vm, 1)
    store.put("good", good)
    store.put("bad", random_adapter(vm, 2))
    ticket = engine.pool.request("bad")  # make "bad" resident, then corrupt its slot
    assert wait_host(ticket, 10)
    slot = engine.pool.acquire(ticket)
    vm.bank.rows[slot].fill_(float("inf"))
    engine.pool.release(slot)
    engine.start()
    try:
        jobs = [("good", [5, 6, 7]), ("bad", [5, 6, 7]), (None, [8, 9])]
        # the bad row asks logprobs too: they are computed for its NaN row and dropped
        seqs = [
            engine.submit(u, ids, SamplingParams(max_new_tokens=6, logprobs=2 if u else None))
            for u, ids in jobs
        ]
        reasons = []
        for seq in seqs:
            while (ev := seq.channel.get_sync(timeout=60)).finish_reason is None:
                pass
            reasons.append((ev.finish_reason, ev.error))
        assert reasons[0] == ("length", None) and reasons[2] == ("length", None)
        assert reasons[1][0] == "error" and "NaN/Inf" in reasons[1][1]
        want = reference(vm, good, [5, 6, 7], 6)
        assert seqs[0].output_ids == want
        again = engine.submit("good", [5, 6, 7], SamplingParams(max_new_tokens=6))
        while again.channel.get_sync(timeout=60).finish_reason is None:
            pass
        assert again.output_ids == want  # the poisoned KV row was cleaned
    finally:
        engine.stop()


def test_queued_base_requests_start_as_rows_free(make_tiny, tmp_path) -> None:
    """Requests queued behind a full batch start as soon as rows free, with no adapter load
    to wake the engine (nothing polls: the step that frees a row schedules again)."""
    _, _, engine = build(make_tiny, "llama", tmp_path, max_batch=2)
    engine.start()
    try:
        t0 = time.perf_counter()
        seqs = [engine.submit(None, [5, 6, 7], SamplingParams(max_new_tokens=4)) for _ in range(7)]
        for seq in seqs:
            while (ev := seq.channel.get_sync(timeout=30)).finish_reason is None:
                pass
            assert ev.finish_reason == "length"
        assert time.perf_counter() - t0 < 10
    finally:
        engine.stop()


@pytest.mark.parametrize(
    "kind,chunk,static,new",
    [
        ("llama", 1024, False, 5),
        ("llama", 1024, False, 1),  # the first prompt is done in the step that computes it
        ("llama", 7, False, 5),
        ("gpt2", 1024, True, 5),
    ],
)
def test_a_shared_preamble_is_computed_once_and_every_prompt_gets_its_own_tokens(
    make_tiny, tmp_path, kind, chunk, static, new
) -> None:
    """Prompts of one user that begin with the same 20 tokens (a system prompt sent with every
    request): the first computes them, the others copy its K/V and prefill only their own
    tails, and every one gets the tokens it gets alone, also when the first one ends at its
    first token. The same preamble under the base model (another adapter) is computed
    again."""
    vm, store, engine = build(
        make_tiny, kind, tmp_path, max_batch=5, max_prefill_tokens=chunk, static_decode=static
    )
    adapter = random_adapter(vm, 5)
    store.put("ana", adapter)
    preamble = list(range(30, 50))
    tails = [[7, 8, 9], [11, 12], [13, 14, 15, 16], [11, 12, 17]]  # the last: 22 with the 2nd
    prompts = [preamble + t for t in tails]
    params = SamplingParams(max_new_tokens=new)
    engine.start()
    try:
        with forward_tokens(vm) as prefilled:
            out = engine.generate(
                [("ana", p, params) for p in prompts] + [(None, prompts[0], params)]
            )
    finally:
        engine.stop()
    assert [r["token_ids"] for r in out[:4]] == [reference(vm, adapter, p, new) for p in prompts]
    assert out[4]["token_ids"] == reference(vm, None, prompts[0], new)
    assert engine.scheduler.forked == 3 and 60 <= engine.scheduler.shared_tokens <= 62
    # two whole prompts (ana's first, the base one), three tails, <= new + 1 steps of <= 5 rows
    assert sum(prefilled) <= 2 * 23 + 3 + 2 + 4 + 5 * (new + 1), prefilled


@pytest.mark.parametrize(
    "kind,chunk,static", [("llama", 1024, False), ("llama", 5, False), ("gpt2", 1024, True)]
)
def test_a_conversation_prefills_only_each_turns_new_tokens(
    make_tiny, tmp_path, kind, chunk, static
) -> None:
    """Three turns of one user's conversation, each sent alone after the previous one ended:
    turn k's prompt is turn k-1's prompt, its answer and a new message. Each turn restores the
    K/V the previous one left in the prefix cache, prefills only what is new, and gets the
    tokens ``generate`` gives the whole prompt; the cache ends holding the last turn only."""
    vm, store, engine = build(
        make_tiny, kind, tmp_path, max_batch=2, max_prefill_tokens=chunk, static_decode=static
    )
    adapter = random_adapter(vm, 7)
    store.put("ana", adapter)
    new = 4
    prompt = list(range(30, 50))
    messages = [[7, 8, 9], [11, 12, 13, 14]]
    engine.start()
    try:
        answers, prefilled = [], []
        for turn in range(3):
            with forward_tokens(vm) as seen:
                (out,) = engine.generate([("ana", prompt, SamplingParams(max_new_tokens=new))])
            answers.append((prompt, out["token_ids"]))
            prefilled.append(sum(seen) - (new - 1))  # the decode steps take one token each
            if turn < 2:
                prompt = prompt + out["token_ids"] + messages[turn]
            # between turns another request takes the row (a static cache keeps its buffers)
            engine.generate([(None, list(range(60, 95)), SamplingParams(max_new_tokens=1))])
    finally:
        engine.stop()
    assert [a for _, a in answers] == [reference(vm, adapter, p, new) for p, _ in answers]
    # turn 1 whole; then each turn's own message and the last answer token (never cached)
    assert prefilled == [20, 1 + 3, 1 + 4]
    cache = engine.scheduler.prefixes.stats()
    # ana's turns 2 and 3; the base model's prompt, sent again, all but its last token
    assert cache["hits"] == 4 and cache["hit_tokens"] == (20 + 3) + (27 + 3) + 2 * 34
    assert cache["entries"] == 2 and cache["retained"] == 4  # ana's last turn, the base prompt


@pytest.mark.parametrize("kind,static", [("llama", False), ("gpt2", True)])
def test_a_prompt_copying_from_one_restored_in_the_same_step_gets_the_restored_positions(
    make_tiny, tmp_path, kind, static
) -> None:
    """After a first request ended, two arrive together that begin with its context: the first
    restores it from the prefix cache, the second (sharing no more with the cache than with the
    first) copies the first's row in the same step. The restore must be written before that
    copy reads the row."""
    vm, store, engine = build(make_tiny, kind, tmp_path, max_batch=3, static_decode=static)
    adapter = random_adapter(vm, 9)
    store.put("ana", adapter)
    prompt, new = list(range(30, 50)), 4
    engine.start()
    try:
        (first,) = engine.generate([("ana", prompt, SamplingParams(max_new_tokens=new))])
        context = prompt + first["token_ids"][:-1]  # what the cache holds of it
        other = (first["token_ids"][-1] + 1) % 50
        prompts = [context + [first["token_ids"][-1], 7, 8], context + [other, 9]]
        # a request in between takes row 0 (a static cache keeps its buffers)
        engine.generate([(None, list(range(60, 95)), SamplingParams(max_new_tokens=1))])
        params = SamplingParams(max_new_tokens=new)
        out = engine.generate([("ana", p, params) for p in prompts])
    finally:
        engine.stop()
    assert [r["token_ids"] for r in out] == [reference(vm, adapter, p, new) for p in prompts]
    assert engine.scheduler.prefixes.hits == 1 and engine.scheduler.forked == 2


@pytest.mark.parametrize(
    "kind,chunk,static", [("llama", 1024, False), ("llama", 4, False), ("gpt2", 1024, True)]
)
def test_choices_share_one_prefilled_prompt_and_sample_alone(
    make_tiny, tmp_path, kind, chunk, static
) -> None:
    """``n`` choices of one prompt (submitted together) prefill it once: the others copy its
    K/V and compute only its last token. Each choice still gets what it would alone: greedy
    ones the reference tokens, seeded ones the tokens of the same seed run on its own."""
    vm, store, engine = build(
        make_tiny, kind, tmp_path, max_batch=4, max_prefill_tokens=chunk, static_decode=static
    )
    adapter = random_adapter(vm, 3)
    store.put("ana", adapter)
    prompt = list(range(5, 19))
    greedy = SamplingParams(max_new_tokens=6)
    seeded = [SamplingParams(max_new_tokens=6, temperature=1.0, seed=s) for s in (1, 2)]
    chosen = [greedy, greedy, *seeded]  # two greedy choices, two seeded ones
    engine.start()
    try:
        with forward_tokens(vm) as prefilled:
            together = engine.generate([("ana", prompt, p) for p in chosen])
        tokens_together = sum(prefilled)
        alone = [engine.generate([("ana", prompt, p)])[0] for p in seeded]
    finally:
        engine.stop()
    assert engine.scheduler.forked == 3
    want = reference(vm, adapter, prompt, 6)
    assert [r["token_ids"] for r in together[:2]] == [want, want]
    assert [r["token_ids"] for r in together[2:]] == [r["token_ids"] for r in alone]
    # one whole prompt, one token per other choice, <= 7 steps of <= 4 decode rows (not the
    # 4 x 14 prompt tokens of four prefills)
    assert tokens_together <= len(prompt) + 3 + 4 * 7, prefilled

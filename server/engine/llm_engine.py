"""The engine: one background thread owns the model and runs continuous batching.

One step is schedule -> run -> postprocess: the scheduler admits waiting sequences whose
adapter slot could be claimed; the model runner prefills them (one left-padded forward) and
decodes every running row (one forward, each row with its own adapter slot); postprocess samples
the batch, hands each token to its sequence (which decides whether it is done) and delivers the
events. Sequences join at the next step and leave as soon as they finish.

The scheduler claims adapter slots itself (from the ``SlotPool``) and says in its plan what
could not start; the engine only runs plans. A sequence waiting for its adapter to reach host
memory wakes the loop when the load ends (``SlotPool.on_host_ready``), never by polling.

Other work on the model (a fine-tuning job's forward/backward units) is handed to the same
thread with ``run_background`` (``background.BackgroundWork``), so it never overlaps a serving
forward: it runs back to back while no request is in flight and takes at most
``background_share`` of the time while any is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from server.engine import cpu_threads
from server.engine.adapter_slots import SlotPool
from server.engine.background import BackgroundWork
from server.engine.compile import COMPILE_DELAY_S
from server.engine.detokenizer import StopChecker
from server.engine.errors import ContextTooLong, EngineStopped, InvalidTokens, QueueFull
from server.engine.fair_queue import TenantDefaults, TenantPolicy
from server.engine.grammar import Grammars, advance
from server.engine.model_runner import ModelRunner, PromptScores
from server.engine.sampler import NON_FINITE, sample_step, token_logprobs
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import Channel, Event, Outbox, Sequence, Status
from server.engine.stats import EngineStats
from vera_core.inject import VeraModel

log = logging.getLogger(__name__)
T = TypeVar("T")
ANONYMOUS = "anonymous"  # the client of a base-model request that names none
_IDLE_WAIT_S = 1.0  # nothing to do: look at the stop flag this often
_WAITING_WAIT_S = 0.5  # sequences wait for adapters: re-check their acquire deadline this often


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig = SchedulerConfig()
    max_seq_len: int = 2048  # prompt + new tokens of one sequence (KV positions)
    background_share: float = 0.2  # time background work may take while requests are in flight
    # torch.compile the decode forward: "off", "startup" or "background" (server/engine/compile.py)
    compile: str = "off"
    # decode in bucketed shapes over a KV cache allocated once; with compile on CUDA: CUDA graphs
    static_decode: bool = False
    # CPU, fp32: eager steps use weights prepacked for oneDNN (server/engine/packed_linear.py)
    packed_linears: bool = True
    # CPU: the engine thread's own OpenMP/MKL threads (server/engine/cpu_threads.py); 0: as
    # torch has them
    cpu_threads: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.background_share <= 1:
            raise ValueError("background_share must be in (0, 1]")


class Engine:
    def __init__(
        self,
        vm: VeraModel,
        tokenizer: PreTrainedTokenizerBase,
        pool: SlotPool | None,
        config: EngineConfig,
        tenants: TenantPolicy | None = None,
    ) -> None:
        """``tenants``: each client's weight and queue share (default: weight 1, the
        config's ``max_waiting_per_client``)."""
        self.vm = vm
        self.model = vm.model
        self.tokenizer = tokenizer
        self.pool = pool
        self.config = config
        self.tenants = tenants or TenantDefaults(config.scheduler.max_waiting_per_client)
        self.scheduler = Scheduler(config.scheduler, pool, self.tenants.weight)
        self.device = next(self.model.parameters()).device
        cfg = self.model.config
        self.context_limit = min(
            config.max_seq_len, getattr(cfg, "max_position_embeddings", None) or 10**9
        )
        self.runner = ModelRunner(
            vm,
            config.scheduler.max_batch,
            self.context_limit,
            compile=config.compile,
            static=config.static_decode,
            packed_linears=config.packed_linears,
        )
        self.eos_ids = _eos_ids(self.model, tokenizer)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.grammars = Grammars(tokenizer, self.vocab_size, self.eos_ids)
        self.stats = EngineStats()
        self._ids = itertools.count(1)
        self.background = BackgroundWork(config.background_share)
        self._inbox: deque[Sequence] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._adapter_loaded = False  # a load ended since the loop last looked (under _cv)
        self._blocked = False  # the last step could start nothing: waiting on loads or slots
        self._outbox = Outbox()  # this step's events, handed over when it ends
        self._started_at = time.perf_counter()
        if pool is not None:
            pool.on_host_ready(self._adapter_ready)

    # -- lifecycle ------------------------------------------------------------------------
    def warm_up(self) -> float:
        """Compile the decode step now (before ``start``); seconds taken, 0 if not compiled."""
        with torch.no_grad():
            return self.runner.warm_up()

    def start(self) -> None:
        self._started_at = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="vera-engine", daemon=True)
        self._thread.start()
        # the grammar tokenizer (~0.5 s) off the first structured request's path
        threading.Thread(target=self.grammars.prepare, name="vera-grammar", daemon=True).start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish what is in flight (drain), then stop the loop."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """The engine thread is running (False before ``start`` and after it died/stopped)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def serving(self) -> bool:
        """Requests are queued or in flight (read on the engine thread, e.g. by a background
        unit sizing itself, it is exact)."""
        return bool(self._inbox) or bool(len(self.scheduler))

    # -- API ------------------------------------------------------------------------------
    def submit(
        self,
        user_id: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop | None = None,
        client: str | None = None,
        key_id: str | None = None,
    ) -> Sequence:
        """Queue a request with ``user_id``'s adapter (None: the base model), counted against
        ``client`` (default: ``user_id``, else "anonymous"). Raises QueueFull (the queue, or
        this client's share of it), ContextTooLong, InvalidTokens, EngineStopped, or the
        store's AdapterNotFound when ``user_id`` has no adapter."""
        (seq,) = self.submit_all([(user_id, prompt_ids, params)], loop, client, key_id)
        return seq

    def submit_all(
        self,
        requests: list[tuple[str | None, list[int], SamplingParams]],
        loop: asyncio.AbstractEventLoop | None = None,
        client: str | None = None,
        key_id: str | None = None,
    ) -> list[Sequence]:
        """``submit`` several requests (of one client) as one: the loop sees them together (its
        next step admits them all, as far as the batch allows), and if one is refused none
        is queued."""
        if self._stopping:
            raise EngineStopped("the server is shutting down")
        limit = self.config.scheduler.max_waiting
        if self.queue_depth() + len(requests) > limit:
            raise QueueFull(f"{limit} requests already queued")
        # validation, and the adapter's version check against the store (read-your-writes,
        # I/O): outside the lock
        seqs = [self._sequence(*request, loop, client, key_id) for request in requests]
        with self._cv:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._inbox) + len(self.scheduler.waiting) + len(seqs) > limit:
                raise QueueFull(f"{limit} requests already queued")
            who = seqs[0].client
            share = self.tenants.max_waiting(who)
            mine = self.scheduler.waiting.queued(who)
            mine += sum(1 for s in self._inbox if s.client == who)
            if mine + len(seqs) > share:
                raise QueueFull(
                    f"{who!r} already has {mine} requests queued, its share of the "
                    f"queue is {share}; retry when some have started"
                )
            self._inbox.extend(seqs)
            self.stats.submitted += len(seqs)
            self._cv.notify()
        return seqs

    def _sequence(
        self,
        user_id: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop | None,
        client: str | None,
        key_id: str | None,
    ) -> Sequence:
        """A new sequence for one checked request, its adapter ticket taken."""
        if not prompt_ids:
            raise ContextTooLong("the prompt is empty")
        self._check_tokens(prompt_ids, params)
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.context_limit:
            raise ContextTooLong(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                f"= {total} exceeds the context limit of {self.context_limit} tokens"
            )
        seq = Sequence(
            request_id=f"req-{next(self._ids)}",
            user_id=user_id,
            prompt_ids=list(prompt_ids),
            params=params,
            channel=Channel(loop),
            detok=StopChecker(self.tokenizer, params.stop),
            client=client or user_id or ANONYMOUS,
            key_id=key_id,
        )
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        if params.grammar is not None:
            seq.matcher = self.grammars.matcher(params.grammar)
        if user_id is not None and self.pool is not None:
            seq.ticket = self.pool.request(user_id)
            seq.adapter_version = seq.ticket.version
        return seq

    def _check_tokens(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Every token id a request names is in the vocab (the logits' width)."""
        for what, ids in (
            ("prompt", prompt_ids),
            ("logit_bias", [t for t, _ in params.logit_bias]),
            ("stop_token_ids", params.stop_token_ids),
        ):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidTokens(
                    f"{what}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
                )

    def run_background(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` on the engine thread between steps and return its future: at once while
        no request is in flight; while any is, units are spaced so they take at most
        ``background_share`` of the time. Keep one unit short (it delays every stream by its
        length). Raises EngineStopped once the engine is stopping."""
        with self._cv:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            future = self.background.submit(fn)
            self._cv.notify()
        return future

    def generate(
        self,
        requests: list[tuple[str | None, list[int], SamplingParams]],
        client: str | None = None,
    ) -> list[dict]:
        """Offline: submit all, block until all finish; returns ids, text and finish reason.
        The loop sees the requests together (its first step prefills them all in one forward),
        not the first few while the rest are still being submitted. ``client``: whom they are
        queued and metered as (default: the first request's user, else "anonymous")."""
        seqs = self.submit_all(requests, client=client)
        results = []
        for seq, (_, _, p) in zip(seqs, requests):
            while True:
                ev = seq.channel.get_sync(timeout=600)
                if ev.finish_reason is not None:
                    results.append(
                        {
                            "token_ids": list(seq.output_ids),
                            "text": seq.text,
                            "finish_reason": ev.finish_reason,
                            "error": ev.error,
                            "logprobs": list(seq.logprobs),
                            "prompt_logprobs": list(seq.prompt_logprobs)
                            if p.prompt_logprobs is not None
                            else None,
                        }
                    )
                    break
        return results

    def queue_depth(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting)

    def running(self) -> int:
        return len(self.scheduler.running)

    def kv_cache_bytes(self) -> int:
        return self.runner.kv.nbytes()

    def packed_weights_bytes(self) -> int:
        """Host memory of the weights prepacked for oneDNN (0 when off)."""
        return sum(p.nbytes() for p in self.runner.packed)

    def decode_mode(self) -> dict[str, Any]:
        """How the decode step runs: compiled now, how (``compile``: off, startup, background,
        with the background compile's state), in static (bucketed) shapes, in CUDA graphs;
        whether prompts join decode rows in one forward."""
        r = self.runner
        mode: dict[str, Any] = {
            "compiled": r.compiled,
            "compile": r.compile_mode,
            "static_shapes": r.static,
            "cuda_graphs": r.cuda_graphs,
            "mixed_steps": r.mixed_steps,
            "packed_weights": bool(r.packed),
            "padded_rows": bool(r.padded),  # bf16 on oneDNN: rows padded to a token bucket
            "cpu_threads": self.config.cpu_threads or None,
        }
        if r.compiler is not None:
            mode["background_compile"] = r.compiler.stats()
        return mode

    # -- loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.config.cpu_threads and not cpu_threads.claim(self.config.cpu_threads):
            log.warning("the engine thread could not claim %d threads", self.config.cpu_threads)
        while True:
            with self._cv:
                if not self._has_work():  # woken by work, or at a deadline: look again
                    self._cv.wait(timeout=self._wait_s())
                self._adapter_loaded = False
                while self._inbox:
                    self.scheduler.add(self._inbox.popleft())
                if self._stopping and not len(self.scheduler):
                    self.background.drop_all()
                    return
                serving = bool(len(self.scheduler))
            if serving:
                try:
                    self.step()
                except Exception as e:  # a bug must not leave clients hanging
                    log.exception("engine step failed")
                    self._fail_all(f"internal engine error: {type(e).__name__}: {e}")
                    self._outbox.flush()
            if not self._stopping and self.background.due(serving):
                self.background.run_one(serving)
            self._maybe_start_compile()

    def _maybe_start_compile(self) -> None:
        """--compile background: eager until the compiled step is warm; the compile starts
        once a first request has finished (or after ``COMPILE_DELAY_S``), so that it does not
        slow the server's first answers (compiling holds the GIL for long stretches)."""
        compiler = self.runner.compiler
        if compiler is None or compiler.started or self._stopping:
            return
        served = any(self.stats.finish_reasons.values())
        if served or time.perf_counter() - self._started_at > COMPILE_DELAY_S:
            self.runner.compile_in_background()

    def _has_work(self) -> bool:
        """Under ``_cv``: something can happen now (otherwise the loop sleeps until told)."""
        s = self.scheduler
        return (
            self._stopping
            or bool(self._inbox)
            or bool(s.running)
            or (bool(s.waiting) and (self._adapter_loaded or not self._blocked))
            or self.background.due(serving=bool(len(s)))
        )

    def _wait_s(self) -> float:
        """How long the loop may sleep: until a background unit is due, a waiting sequence's
        acquire deadline may have passed, or (idle) the next look at the stop flag."""
        waiting = bool(self.scheduler.waiting)
        limit = _WAITING_WAIT_S if waiting else _IDLE_WAIT_S
        due = self.background.seconds_until_due(serving=waiting)
        return limit if due is None else max(1e-3, min(limit, due))

    def _adapter_ready(self) -> None:
        """A loader thread finished a host copy: a waiting sequence may start now."""
        with self._cv:
            self._adapter_loaded = True
            self._cv.notify()

    def step(self) -> None:
        """schedule -> run -> postprocess; the step's events are handed over at its end."""
        try:
            self._step()
        finally:
            self._outbox.flush()

    def _step(self) -> None:
        plan = self.scheduler.schedule()
        for seq in plan.dropped:
            self._end(seq, "cancelled")
        for seq, why in plan.failed:
            self._fail(seq, why)
        self.stats.preemptions += len(plan.preempted)
        t0 = time.perf_counter()
        out = self.runner.run(plan, self.scheduler.running)
        if out is not None:
            self._score_prompts(out.scored)
            self._postprocess(out.seqs, out.logits)
        plan.share_time(time.perf_counter() - t0)
        self._blocked = not (plan.prefill or plan.decode or plan.dropped or plan.failed)
        for seq in list(self.scheduler.running):
            if seq.cancelled.is_set():
                self._end(seq, "cancelled")
        if not self.scheduler.running:
            self.runner.idle()  # give the KV memory back

    # -- outputs --------------------------------------------------------------------------
    def _postprocess(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per row of ``logits`` [len(seqs), vocab]; each sequence takes its
        token and says whether it is done; deliver the events."""
        if not seqs:  # a step that only scored prompts
            return
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
        grammar_bias = None
        if constrained:
            bias = self.grammars.bias([seqs[i].matcher for i in constrained])
            grammar_bias = (constrained, bias)
        tokens, logprobs = sample_step(
            logits,
            [s.params for s in seqs],
            [s.generator for s in seqs],
            [s.prompt_ids for s in seqs],
            [s.output_ids for s in seqs],
            self.eos_ids,
            grammar_bias,
        )
        now = time.perf_counter()
        for seq, token, lp in zip(seqs, tokens, logprobs):
            if token == NON_FINITE:
                # its K/V may hold NaN too: the row's next owner must not see it
                self.runner.clear_row(seq)
                self._fail(seq, "the model produced NaN/Inf logits for this request")
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.stats.ttft.add(now - seq.arrival)
            if seq.params.max_new_tokens:  # a scoring-only request outputs nothing
                self.stats.tokens_out(1)
            is_eos = token in self.eos_ids or token in seq.params.stop_token_ids
            kept = len(seq.output_ids)
            delta, reason = seq.append_token(token, is_eos, self.context_limit)
            if len(seq.output_ids) > kept:  # every output token is an event (clients count
                # token ids); its text may be "" while the detokenizer holds back a character
                if lp is not None:
                    seq.logprobs.append(lp)
                self._outbox.push(
                    seq.channel,
                    Event(
                        text=delta,
                        token_id=token,
                        logprobs=lp,
                        prompt_logprobs=seq.take_prompt_logprobs(),
                    ),
                )
            if seq.matcher is not None and reason is None:
                state = advance(seq.matcher, token)
                if state is not None and state != "stop":
                    self._fail(seq, f"structured output failed: {state}")
                    continue
                reason = state  # "stop" once the grammar is complete
            if reason is not None:
                self._end(seq, reason)

    def _score_prompts(self, scored: list[PromptScores]) -> None:
        """Each scored prompt position's next prompt token: its logprob and the row's top k
        (the model's log-softmax, no penalties), one ``log_softmax`` and ``topk`` for all."""
        if not scored:
            return
        targets, ks = [], []
        for s in scored:
            n = s.logits.shape[0]
            targets += s.seq.prompt_ids[s.start + 1 : s.start + 1 + n]
            ks += [s.seq.params.prompt_logprobs or 0] * n
        logits = torch.cat([s.logits for s in scored])  # [positions, vocab]
        found = token_logprobs(logits, torch.tensor(targets, device=logits.device), ks)
        at = 0
        for s in scored:
            n = s.logits.shape[0]
            have = s.seq.prompt_logprobs  # positions already scored are skipped
            have += found[at + max(0, len(have) - 1 - s.start) : at + n]
            at += n

    def _end(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.finished_at is not None:
            return
        if reason != "cancelled":
            tail = seq.flush_text()
            if tail:
                self._outbox.push(seq.channel, Event(text=tail))
        prompt_logprobs = seq.take_prompt_logprobs() if reason != "error" else None
        if seq.status is Status.RUNNING:
            if reason in ("stop", "length"):  # its K/V are whole: the next turn may begin so
                self.scheduler.retain(seq, self.runner.kv)
            self.scheduler.finish(seq)  # unpins its adapter slot, frees its KV row
        seq.status = Status.FINISHED
        seq.finished_at = time.perf_counter()
        self.stats.finished(seq, reason)
        self._outbox.push(
            seq.channel,
            Event(
                finish_reason=reason,
                error=error,
                usage={
                    "prompt_tokens": len(seq.prompt_ids),
                    "completion_tokens": len(seq.output_ids),
                    "cached_tokens": seq.shared,  # copied or restored, not computed
                },
                timing=seq.timing(),
                prompt_logprobs=prompt_logprobs,
            ),
        )

    def _fail(self, seq: Sequence, message: str) -> None:
        seq.cancelled.set()
        self._end(seq, "error", message)

    def _fail_all(self, message: str) -> None:
        for seq in list(self.scheduler.running) + self.scheduler.take_waiting():
            self._fail(seq, message)
        self.runner.idle()


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids

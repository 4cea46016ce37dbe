"""Turns a step plan into model forwards: batched prefill and one-token decode.

Owns the KV cache (capacity, compaction, clearing) and hands it to a Hugging Face causal LM as
its cache, with explicit 4D masks and per-row positions. Everything one forward needs beyond
its inputs (where the KV cache writes, each row's adapter slot) is one object
(``steps.DecodeForward`` / ``steps.PrefillForward``), made for that forward and set in one
place, ``_forward``, through ``VeraModel.run``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch

from server.engine.attention import use_slot_attention
from server.engine.compile import DecodeCompiler, compile_decode
from server.engine.kv_cache import SlotKVCache
from server.engine.packed_linear import PackedLinear, PaddedLinear, engine_linears
from server.engine.scheduler import Chunk, Restore, RowMove, StepPlan
from server.engine.sequence import Sequence
from server.engine.shapes import bucket, len_buckets, row_buckets
from server.engine.steps import ChunkSpan, DecodeForward, MixedForward, PrefillForward
from vera_core.inject import VeraModel

COMPILE_MODES = ("off", "startup", "background")


class DecodeSignature(NamedTuple):
    """What sets a compiled decode graph apart (batch and KV length are dynamic sizes)."""

    single: bool  # batch of one (dynamo specializes size 1)
    adapted: bool  # some row runs an adapter (the VeRA path is traced)
    compact: bool  # KV rows 0..n-1, read as a view (else gathered by row_index)


class PromptScores(NamedTuple):
    """Logits of a scoring row's prompt positions ``start..start+n-1`` (position p predicts
    context token p + 1): [n, vocab] float32."""

    seq: Sequence
    start: int
    logits: torch.Tensor


class StepOutput(NamedTuple):
    seqs: list[Sequence]  # the rows that sample a token this step
    logits: torch.Tensor  # [len(seqs), vocab] float32
    scored: list[PromptScores]  # prompt positions scored this step


def _scored_positions(chunk: Chunk) -> int:
    """How many of ``chunk``'s first positions predict a prompt token the sequence asked to
    score and has not yet (a re-prefill after preemption scores nothing twice)."""
    seq = chunk.seq
    if seq.params.prompt_logprobs is None or len(seq.prompt_logprobs) >= len(seq.prompt_ids):
        return 0
    return max(0, min(chunk.start + chunk.length, len(seq.prompt_ids) - 1) - chunk.start)


class ModelRunner:
    def __init__(
        self,
        vm: VeraModel,
        max_rows: int,
        max_len: int,
        compile: str = "off",
        static: bool = False,
        packed_linears: bool = False,
    ) -> None:
        """``compile``: how the decode forward is compiled (``server/engine/compile.py``):
        "off", "startup" (``warm_up`` before serving) or "background" (``compile_in_background``
        while serving eagerly). ``static``: decode in bucketed shapes over a KV cache allocated
        once (what CUDA graphs need; with "startup" on CUDA the decode step is captured in
        graphs). ``packed_linears``: on a CPU in fp32, eager steps multiply small batches with
        weights prepacked for oneDNN (``server/engine/packed_linear.py``); not with a compiled
        decode step, which traces the plain layers. In bf16 on a CPU, engine forwards pad their
        rows to a token bucket (the same module), whatever ``packed_linears``."""
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, not {compile!r}")
        self.vm = vm
        self.model = vm.model
        param = next(self.model.parameters())
        self.device = param.device
        cfg = self.model.config
        self.num_layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
        # buffers take K/V's device and dtype
        self.kv = SlotKVCache(self.num_layers, max_rows, max_len, vm.forwards, static=static)
        if static:
            self.kv.allocate_static(*_kv_head_shape(cfg), param.dtype, self.device)
        self.static = static
        self.row_buckets = row_buckets(max_rows)
        self.len_buckets = len_buckets(max_len)
        # transformers >= 5.2x renamed past_key_values -> cache
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.max_len = max_len
        # decode only: prefill shapes vary with every prompt (see server/engine/compile.py)
        self.cuda_graphs = compile == "startup" and static and self.device.type == "cuda"
        if self.cuda_graphs:
            for t in (vm.bank.rows, vm.projections.A, vm.projections.B):
                torch._dynamo.mark_static_address(t)  # read in place by every replay
        self.compiler = DecodeCompiler(self.model) if compile == "background" else None
        self._decode_model: Callable[..., Any] = self.model  # "background": see _decode_tokens
        if compile == "startup":
            self._decode_model = compile_decode(self.model, cuda_graphs=self.cuda_graphs)
        self.compile_mode = compile
        linears = engine_linears(self.model, vm.forwards, pack=packed_linears and compile == "off")
        self.packed = [p for p in linears if isinstance(p, PackedLinear)]
        self.padded = [p for p in linears if isinstance(p, PaddedLinear)]
        # a step that both prefills and decodes runs one forward (server/engine/attention.py);
        # not with a static cache, whose bucketed decode shapes are what its graphs replay
        self.mixed_steps = not static and use_slot_attention(self.model)

    @property
    def compiled(self) -> bool:
        """Decode forwards run compiled now (after a background warm-up: once it is ready)."""
        if self.compiler is not None:
            return self.compiler.state == "ready"
        return self.compile_mode == "startup"

    # -- one step -------------------------------------------------------------------------
    def run(self, plan: StepPlan, running: list[Sequence]) -> StepOutput | None:
        """Prefill ``plan.prefill``, decode the live rows of ``plan.decode``: the sequences
        that produced logits, those logits [len(seqs), vocab] in float32, and the logits of
        the prompt positions that scoring rows asked for; None if no sequence ran.
        The plan's row writes (compaction, prompts shared from cached rows, prefixes restored
        from the prefix cache) come first, its prompt copies (from rows this step computed)
        last."""
        if not running:
            return None
        out = self._run(plan, running)
        groups: dict[tuple[int, int], list[int]] = {}  # (source row, length) -> rows
        for copy in plan.copies:  # every source computed its part in this forward
            groups.setdefault((copy.src.kv_row, copy.length), []).append(copy.dst.kv_row)
            copy.dst.num_cached = copy.length
        for (src, length), dsts in groups.items():
            self.kv.copy_rows(src, dsts, length)
        return out

    def _run(self, plan: StepPlan, running: list[Sequence]) -> StepOutput | None:
        need = max(s.num_tokens + 1 for s in running)
        # rows: this plan's (a move's source may lie past them: the row left when its sequence
        # was preempted in the same plan)
        moves = [m for m in plan.moves if isinstance(m, RowMove)]
        rows = max([len(running)] + [m.src + 1 for m in moves if m.length])
        self.kv.reserve(rows, min(need, self.max_len))
        for move in plan.moves:  # in order: a move may copy on what a restore wrote
            if isinstance(move, Restore):  # a prompt prefix from the prefix cache
                self.kv.write_row(move.row, move.entry.kv, move.length)
            elif move.length:  # a row admitted in this plan holds nothing to copy yet
                self.kv.move_row(move.src, move.dst, move.length)
        live = [s for s in plan.decode if not s.cancelled.is_set()]
        if plan.prefill and live and self.mixed_steps:
            return self.mixed(plan.prefill, live)
        seqs: list[Sequence] = []
        logits: list[torch.Tensor] = []  # [rows, vocab] per forward
        scored: list[PromptScores] = []
        if plan.prefill:
            out, scored = self.prefill(plan.prefill)
            final = [c.final for c in plan.prefill]  # earlier chunks' logits are not needed
            seqs += [c.seq for c in plan.prefill if c.final]
            if any(final):
                logits.append(out if all(final) else out[torch.tensor(final, device=out.device)])
        if live:
            seqs += live
            logits.append(self.decode(live))
        if not seqs and not scored:
            return None
        if not logits:
            return StepOutput([], torch.empty(0, 0), scored)
        return StepOutput(
            seqs, (logits[0] if len(logits) == 1 else torch.cat(logits)).float(), scored
        )

    def clear_row(self, seq: Sequence) -> None:
        """Zero what ``seq`` wrote (its values were not finite): the row's next owner reads
        masked columns too, and 0 * NaN is NaN."""
        self.kv.clear_row(seq.kv_row, seq.num_cached + 1)

    def warm_up(self) -> float:
        """ "startup": compile now, not under the first requests: one decode forward per graph
        the compiled step needs (dynamic shapes: batch 1 and batch >= 2; static: every row
        bucket at the first length bucket, the rest recorded when first used), for base rows
        and adapter rows. Returns the seconds it took (0 when not compiled at startup)."""
        if self.compile_mode != "startup":
            return 0.0
        t0 = time.perf_counter()
        sizes = self.row_buckets if self.static else sorted({1, min(2, self.kv.max_rows)})
        for rows in sizes:
            self.kv.reserve(rows, 2)
            for slot in (0, 1):  # slot 1 may be empty (b = 0): the graph is what matters
                for _ in range(3 if self.cuda_graphs else 1):  # warm-up run, record, replay
                    self._decode_tokens([0] * rows, [1] * rows, list(range(rows)), [slot] * rows)
        self.kv.release_all()
        return time.perf_counter() - t0

    def compile_in_background(self) -> None:
        """ "background": compile and warm the decode step on another thread; decodes run
        eager until it is ready (``self.compiler.state``)."""
        assert self.compiler is not None, "the runner was not made to compile in the background"
        self.compiler.start(self._warm_in_background)

    def _warm_in_background(
        self, compiled: Callable[..., Any], done: Callable[[DecodeSignature], None]
    ) -> None:
        """On the compile thread: the decode shapes the engine meets most, on a KV cache of its
        own, most common first: batch >= 2 with adapter rows, then base rows, then batch 1
        (dynamo specializes size 1); compact KV rows only (others stay eager)."""
        kv = SlotKVCache(self.num_layers, 2, self.max_len, self.vm.forwards)
        kv.reserve(2, 2)
        # eager first: the cache allocates its buffers on its first write, and the compiled
        # step must meet them allocated, as it will on the engine thread
        self._decode_tokens([0, 0], [1, 1], [0, 1], [0, 0], model=self.model, kv=kv)
        for rows in (2, 1):
            for slot in (1, 0):  # slot 1 may be empty (b = 0): the graph is what matters
                tokens, positions = [0] * rows, [1] * rows
                self._decode_tokens(
                    tokens, positions, list(range(rows)), [slot] * rows, compiled, kv
                )
                done(DecodeSignature(rows == 1, bool(slot), True))

    def idle(self) -> None:
        """Nothing is running: free the KV buffers."""
        self.kv.release_all()

    # -- forwards -------------------------------------------------------------------------
    def _forward(
        self,
        model: Callable[..., Any],  # the model, or its compiled decode step
        ids: torch.Tensor,  # [batch, tokens]
        mask: torch.Tensor,  # [batch, 1, tokens, kv_len] bool, True = attend
        pos: torch.Tensor,  # [batch, tokens] position ids
        step: DecodeForward | PrefillForward,  # adapter slots and KV positions of this forward
        kv: SlotKVCache | None = None,  # default: the engine's
        keep: int = 1,  # the last ``keep`` positions get logits
    ) -> torch.Tensor:
        """[batch, keep, vocab] logits of the last ``keep`` positions."""
        with self.vm.run(step):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=keep,
                **{self._cache_kw: self.kv if kv is None else kv},
            )
        return out.logits

    def _slots(self, slots: list[int]) -> torch.Tensor | None:
        """[batch] adapter slots on the device; None when every row is the base model."""
        return torch.tensor(slots, device=self.device) if any(slots) else None

    def prefill(self, chunks: list[Chunk]) -> tuple[torch.Tensor, list[PromptScores]]:
        """Prompt chunks in one left-padded forward: [len(chunks), vocab] logits of each
        chunk's last token (the next-token logits when the chunk ends its prompt), and the
        logits of the positions scoring rows asked for. Those need the LM head over the last
        ``max(len(chunk) of a scoring row)`` columns of every row of this forward (the
        columns are shared); a forward without scoring rows keeps one."""
        lens = [c.length for c in chunks]
        starts = [c.start for c in chunks]
        width = max(lens)
        kv_len = max(st + n for st, n in zip(starts, lens)) if any(starts) else width
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        pos = torch.zeros(len(chunks), width, dtype=torch.long)
        for i, c in enumerate(chunks):
            ids[i, width - c.length :] = torch.tensor(
                c.seq.context_ids()[c.start : c.start + c.length]
            )
            pos[i, width - c.length :] = torch.arange(c.start, c.start + c.length)
        step = PrefillForward(
            slots=self._slots([c.seq.adapter_slot for c in chunks]),
            kv_rows=[c.seq.kv_row for c in chunks],
            lens=lens,
            starts=starts,
            kv_len=kv_len,
        )
        spans = [_scored_positions(c) for c in chunks]
        keep = max([c.length for c, n in zip(chunks, spans) if n] or [1])
        logits = self._forward(
            self.model,
            ids.to(self.device),
            _chunk_mask(starts, lens, width, kv_len).to(self.device),
            pos.to(self.device),
            step,
            keep=keep,
        )  # [batch, keep, vocab]
        for c in chunks:
            c.seq.num_cached = c.start + c.length
        scored = [
            PromptScores(c.seq, c.start, logits[i, keep - c.length : keep - c.length + n].float())
            for i, (c, n) in enumerate(zip(chunks, spans))
            if n
        ]
        return logits[:, -1], scored

    def mixed(self, chunks: list[Chunk], decode: list[Sequence]) -> StepOutput:
        """``decode`` rows and prompt ``chunks`` in one forward over a flat token axis: the
        sequences that produced logits (the decode rows, then the chunks that end their
        prompts), their logits [n, vocab] in float32, and the logits of the prompt positions
        scoring rows asked for (the LM head runs on those positions only)."""
        ids = [s.output_ids[-1] for s in decode]
        rows = [s.kv_row for s in decode]
        positions = [s.num_cached for s in decode]
        slots = [s.adapter_slot for s in decode]
        spans: list[ChunkSpan] = []
        keep = list(range(len(decode)))  # flat positions whose logits are sampled
        for c in chunks:
            offset, row, end = len(ids), c.seq.kv_row, c.start + c.length
            ids += c.seq.context_ids()[c.start : end]
            rows += [row] * c.length
            positions += range(c.start, end)
            slots += [c.seq.adapter_slot] * c.length
            mask = None
            if c.start:  # query i (position start + i) sees columns 0..start + i
                q = torch.arange(c.start, end, device=self.device)[:, None]
                mask = (torch.arange(end, device=self.device)[None, :] <= q)[None, None]
            spans.append(ChunkSpan(offset, row, c.start, c.length, mask))
            if c.final:
                keep.append(offset + c.length - 1)
        sampled = len(keep)
        counts = [_scored_positions(c) for c in chunks]
        for span, n in zip(spans, counts):
            keep += range(span.offset, span.offset + n)
        d = len(decode)
        pos = torch.tensor(positions, device=self.device)  # [tokens]
        kv_len = max(positions[:d]) + 1
        cols = torch.arange(kv_len, device=self.device)
        step = MixedForward(
            slots=torch.tensor([slots], device=self.device) if any(slots) else None,
            token_rows=torch.tensor(rows, device=self.device),
            token_positions=pos,
            decode_rows=d,
            row_index=None if rows[:d] == list(range(d)) else pos.new_tensor(rows[:d]),
            decode_mask=_decode_mask(cols, pos[:d]),
            chunks=spans,
        )
        with self.vm.run(step):
            out = self.model(
                input_ids=torch.tensor([ids], device=self.device),
                # 4D: transformers takes it as given (the attention reads the step instead)
                attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device),
                position_ids=pos[None],
                use_cache=True,
                logits_to_keep=torch.tensor(keep, device=self.device),
                vera_forward=step,
                **{self._cache_kw: self.kv},
            )
        for s in decode:
            s.num_cached += 1
        for c in chunks:
            c.seq.num_cached = c.start + c.length
        seqs = decode + [c.seq for c in chunks if c.final]
        logits = out.logits[0].float()  # [len(keep), vocab]
        scored, at = [], sampled
        for c, n in zip(chunks, counts):
            if n:
                scored.append(PromptScores(c.seq, c.start, logits[at : at + n]))
                at += n
        return StepOutput(seqs, logits[:sampled], scored)

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One new token for each of ``seqs`` (prompts cached): [n, vocab] logits."""
        logits = self._decode_tokens(
            [s.output_ids[-1] for s in seqs],
            [s.num_cached for s in seqs],
            [s.kv_row for s in seqs],
            [s.adapter_slot for s in seqs],
        )
        for s in seqs:
            s.num_cached += 1
        return logits

    def _decode_tokens(
        self,
        tokens: list[int],
        positions: list[int],
        rows: list[int],
        slots: list[int],
        model: Callable[..., Any] | None = None,  # default: the decode step in use
        kv: SlotKVCache | None = None,  # default: the engine's
    ) -> torch.Tensor:
        """One decode forward: row i feeds ``tokens[i]`` at ``positions[i]`` into KV row
        ``rows[i]`` with adapter slot ``slots[i]``. [len(tokens), vocab] logits.

        Static shapes: the batch is padded to its row bucket with rows that feed token 0 at
        position 0, write the scratch column and attend to column 0 only (their logits are
        dropped), and attention spans the length bucket of columns, masked past each row's
        position. The compact case reads KV rows 0..bucket-1 as a view: pad rows past the live
        ones write only scratch columns, which no sequence reads."""
        n = len(tokens)
        kv_len = max(positions) + 1
        compact = rows == list(range(n))  # the usual case: read the cache as a view
        write = positions
        if self.static:
            pad = bucket(n, self.row_buckets) - n
            kv_len = bucket(kv_len, self.len_buckets)
            tokens, slots = tokens + [0] * pad, slots + [0] * pad
            write = positions + [self.kv.scratch] * pad
            positions = positions + [0] * pad
            rows = list(range(n + pad)) if compact else rows + [0] * pad
        ids = torch.tensor(tokens, device=self.device)[:, None]  # [B, 1]
        pos = torch.tensor(positions, device=self.device)  # [B]
        cols = torch.arange(kv_len, device=self.device)
        mask = _decode_mask(cols, pos)
        step = DecodeForward(
            slots=self._slots(slots),
            positions=torch.tensor(write, device=self.device) if self.static else pos,
            row_index=None if compact else torch.tensor(rows, device=self.device),
            columns=cols,
        )
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if model is None:
            model = self._decode_model
            if self.compiler is not None:  # compiled per shape, as each is warm
                sig = DecodeSignature(n == 1, step.adapted, step.row_index is None)
                model = partial(self.compiler, sig)
        logits = self._forward(model, ids, mask, pos[:, None], step, kv)[:, -1]
        # a replay's outputs live in the graph's memory, overwritten by the next replay
        return logits[:n].clone() if self.cuda_graphs else logits[:n]


def _decode_mask(cols: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1, kv_len] bool, True = attend: row i's one query (at ``pos[i]``) sees every
    column up to its position. cols: [kv_len] 0..kv_len-1; pos: [B]."""
    return (cols[None, :] <= pos[:, None])[:, None, None, :]


def _chunk_mask(starts: list[int], lens: list[int], width: int, kv_len: int) -> torch.Tensor:
    """[B, 1, width, kv_len] bool, True = attend: row i's chunk is its last ``lens[i]`` query
    columns at positions ``starts[i]..``; a query sees every cached key up to its position.
    Pad queries see key 0 only (their output is discarded; a row of all False would be NaN)."""
    q = torch.arange(width)[None, :, None]  # [1, width, 1]
    k = torch.arange(kv_len)[None, None, :]  # [1, 1, kv_len]
    start = torch.tensor(starts)[:, None, None]
    pad = width - torch.tensor(lens)[:, None, None]  # first real query column per row
    real = q >= pad
    if not any(starts):  # keys are this forward's own columns (left-padded like the queries)
        mask = (k <= q) & (k >= pad) & real
        return (mask | ((k == q) & ~real))[:, None]
    position = start + q - pad  # absolute position of each real query
    return ((k <= position) & real | (k == 0) & ~real)[:, None]


def _kv_head_shape(cfg) -> tuple[int, int]:
    """(key/value heads, head dim) of a Hugging Face model config (llama-like or gpt2)."""
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return kv_heads, getattr(cfg, "head_dim", None) or hidden // heads

"""Structured output in the engine: each row's mask is exactly what its grammar's matcher
accepts; constrained rows always give JSON valid for their own schema, in one batch with rows
under other schemas and rows without any, and no row's tokens depend on its neighbours."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch

from server.engine import Engine, EngineConfig, InvalidGrammar, SamplingParams
from server.engine.grammar import json_schema_grammar
from server.model_source import load_model
from vera_core import VeraConfig, inject_vera

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
        "sunny": {"type": "boolean"},
    },
    "required": ["city", "sunny"],
    "additionalProperties": False,
}
STEPS = {
    "type": "object",
    "properties": {"steps": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["steps"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine():
    model, tok, _ = load_model()
    vm = inject_vera(model, VeraConfig(r=16), num_slots=2)
    eng = Engine(vm, tok, None, EngineConfig())
    eng.start()
    yield eng
    eng.stop()


def chat(eng: Engine, text: str) -> list[int]:
    msgs = [{"role": "user", "content": text}]
    return list(
        eng.tokenizer.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def test_mask_is_what_the_matcher_accepts(engine: Engine) -> None:
    """After each of a valid JSON's tokens, a token is in the unpacked mask iff llguidance's
    matcher consumes it (checked on a sample of allowed and refused tokens per position)."""
    grammars = engine.grammars
    matcher = grammars.matcher(json_schema_grammar(PERSON))
    text = json.dumps({"name": "Ana", "age": 31}, separators=(",", ":"))
    g = torch.Generator().manual_seed(0)
    for token in engine.tokenizer.encode(text) + [engine.tokenizer.eos_token_id]:
        (mask,) = grammars.bias([matcher]) == 0  # [vocab]
        assert mask.shape == (engine.vocab_size,) and bool(mask[token])
        for wanted in (True, False):
            ids = mask.eq(wanted).nonzero()[:, 0]
            for t in ids[torch.randperm(len(ids), generator=g)[:40]].tolist():
                assert matcher.deep_copy().consume_token(t) == wanted, (t, wanted)
        assert matcher.consume_token(token)
    assert matcher.is_stopped()


def test_many_schemas_and_free_rows_share_a_batch(engine: Engine) -> None:
    schemas = [PERSON, CITY, STEPS, None]  # None: any JSON object
    asks = ["Describe a person.", "Pick a city.", "How do I make tea?", "Describe a cat."]
    requests = []
    for schema, ask in zip(schemas, asks):
        grammar = json_schema_grammar(schema)
        ids = chat(engine, ask + " Answer in JSON.")
        requests.append((None, ids, SamplingParams(max_new_tokens=120, grammar=grammar)))
        sampled = SamplingParams(max_new_tokens=120, temperature=0.8, seed=5, grammar=grammar)
        requests.append((None, ids, sampled))
    free = (None, chat(engine, "Say hello."), SamplingParams(max_new_tokens=12))
    together = engine.generate([*requests, free])
    for (_, _, params), out, schema in zip(requests, together, [s for s in schemas for _ in "ab"]):
        if out["finish_reason"] == "length":  # a sampled 100-digit number, an open-ended
            # object: the budget ends first (not for the greedy closed schemas) ...
            assert not (params.greedy and schema is not None)
            # ... but every token fits the grammar
            assert engine.grammars.matcher(params.grammar or "").consume_tokens(out["token_ids"])
            continue
        assert out["finish_reason"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), schema or {"type": "object"})
    alone = [engine.generate([r])[0] for r in (requests[0], requests[3], free)]
    assert [a["token_ids"] for a in alone] == [
        together[i]["token_ids"] for i in (0, 3, len(requests))
    ]
    assert not together[-1]["text"].startswith("{")  # the free row was not constrained


def test_logprobs_of_a_constrained_row_are_over_the_allowed_tokens(engine: Engine) -> None:
    ids = chat(engine, "Pick a city. Answer in JSON.")
    params = SamplingParams(max_new_tokens=30, logprobs=5, grammar=json_schema_grammar(CITY))
    (out,) = engine.generate([(None, ids, params)])
    first = out["logprobs"][0]
    fresh = engine.grammars.matcher(params.grammar or "")
    finite = [t for t, lp in first.top if lp > float("-inf")]
    assert finite and all(fresh.deep_copy().consume_token(t) for t in finite)
    assert all(not fresh.deep_copy().consume_token(t) for t, lp in first.top if lp == -np.inf)
    scoring = SamplingParams(max_new_tokens=0, prompt_logprobs=0)
    (free,) = engine.generate([(None, ids + [first.token], scoring)])
    unconstrained = free["prompt_logprobs"][-1].logprob
    # the allowed tokens' probabilities renormalized: exp(lp) = p / (mass allowed) > p
    assert unconstrained < first.logprob <= 0.0
    assert sum(np.exp(lp) for _, lp in first.top) <= 1.0 + 1e-5


def test_bad_grammars_are_refused_at_submit(engine: Engine) -> None:
    missing = json_schema_grammar({"$ref": "#/$defs/missing"})
    with pytest.raises(InvalidGrammar, match="/[$]defs/missing"):
        engine.submit(None, [1, 2], SamplingParams(grammar=missing))
    with pytest.raises(InvalidGrammar, match="invalid grammar"):
        engine.submit(None, [1, 2], SamplingParams(grammar="start: nonsense_rule"))
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, grammar=json_schema_grammar(None))

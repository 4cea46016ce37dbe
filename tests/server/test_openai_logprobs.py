"""Logprobs, echo and prompt scoring, sampling controls and refused fields through /v1 with the
official ``openai`` client, on a live tiny-model server; the numbers equal an fp32 oracle
(transformers for the base model, PEFT's VeRA for a user's adapter)."""

from __future__ import annotations

import json

import pytest
import torch
from openai import BadRequestError, UnprocessableEntityError
from tiny_server import Tiny

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    server = Tiny(tmp_path_factory.mktemp("openai-logprobs"))
    yield server
    server.live.stop()


def text_of(tok, token: int) -> str:
    return tok.decode([token])


def test_completion_logprobs_plain_and_streamed(tiny: Tiny) -> None:
    prompt = "The capital of Italy is"
    ids = tiny.tok(prompt)["input_ids"]
    want_ids = tiny.greedy(ids, 5)
    lsm = tiny.log_softmax(ids + want_ids)
    oa = tiny.client()
    out = oa.completions.create(
        model=tiny.name, prompt=prompt, max_tokens=5, temperature=0, logprobs=3
    )
    lp = out.choices[0].logprobs
    assert lp.tokens == [text_of(tiny.tok, t) for t in want_ids]
    for i, t in enumerate(want_ids):
        row = lsm[len(ids) - 1 + i]
        assert abs(lp.token_logprobs[i] - row[t].item()) < TOL
        top = row.topk(3)
        want_top = {text_of(tiny.tok, j): v for j, v in zip(top.indices.tolist(), top.values)}
        assert lp.top_logprobs[i].keys() == want_top.keys()
        assert all(abs(lp.top_logprobs[i][k] - want_top[k].item()) < TOL for k in want_top)
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(5)]
    chunks = list(
        oa.completions.create(
            model=tiny.name, prompt=prompt, max_tokens=5, temperature=0, logprobs=3, stream=True
        )
    )
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert sum((s.tokens for s in streamed), []) == lp.tokens
    assert sum((s.token_logprobs for s in streamed), []) == lp.token_logprobs
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_with_an_adapter(tiny: Tiny, stream: bool) -> None:
    msgs = [{"role": "user", "content": "Name a fruit."}]
    ids = tiny.tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    want_ids = tiny.greedy(list(ids), 6, adapter=True)
    lsm = tiny.log_softmax(list(ids) + want_ids, adapter=True)
    args = dict(model="eve", messages=msgs, max_tokens=6, temperature=0, logprobs=True)
    out = tiny.client().chat.completions.create(**args, top_logprobs=2, stream=stream)
    if stream:
        content = [
            e
            for c in out
            if c.choices and c.choices[0].logprobs
            for e in c.choices[0].logprobs.content
        ]
    else:
        content = out.choices[0].logprobs.content
    assert [e.token for e in content] == [text_of(tiny.tok, t) for t in want_ids]
    for i, (e, t) in enumerate(zip(content, want_ids)):
        row = lsm[len(ids) - 1 + i]
        assert abs(e.logprob - row[t].item()) < TOL
        assert e.bytes == list(e.token.encode())
        top = row.topk(2)
        assert [x.token for x in e.top_logprobs] == [text_of(tiny.tok, j) for j in top.indices]
        assert max(abs(x.logprob - v) for x, v in zip(e.top_logprobs, top.values.tolist())) < TOL


def test_echo_scores_token_id_prompts_in_one_request(tiny: Tiny) -> None:
    """What lm-evaluation-harness sends for loglikelihood: token-id prompts, echo, logprobs 1,
    max_tokens 0 (and 1): each prompt token's logprob is the oracle's, the first None."""
    prompts = [tiny.tok(t)["input_ids"] for t in ("Paris is in France", "Two plus two is four")]
    oa = tiny.client()
    for max_tokens in (0, 1):
        out = oa.completions.create(
            model="eve", prompt=prompts, echo=True, logprobs=1, max_tokens=max_tokens, temperature=0
        )
        assert [c.index for c in out.choices] == [0, 1]
        for ids, choice in zip(prompts, out.choices):
            lp = choice.logprobs
            assert len(lp.token_logprobs) == len(ids) + max_tokens
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            lsm = tiny.log_softmax(ids, adapter=True)
            for j in range(1, len(ids)):
                assert abs(lp.token_logprobs[j] - lsm[j - 1, ids[j]].item()) < TOL
                best = int(lsm[j - 1].argmax())
                assert list(lp.top_logprobs[j]) == [text_of(tiny.tok, best)]
            assert choice.text.startswith(tiny.tok.decode(ids))


def test_echo_of_a_string_prompt_lines_up_with_its_text(tiny: Tiny) -> None:
    prompt = "Héllo 😀 wörld, ok"
    out = tiny.client().completions.create(
        model=tiny.name, prompt=prompt, echo=True, logprobs=0, max_tokens=2, temperature=0
    )
    c = out.choices[0]
    ids = tiny.tok(prompt)["input_ids"]
    assert c.text.startswith(prompt) and c.logprobs.tokens[: len(ids)] == [
        text_of(tiny.tok, t) for t in ids
    ]
    offsets = c.logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)
    # every token starts where the text decoded so far ends
    for j in range(1, len(ids)):
        assert offsets[j] == len(tiny.tok.decode(ids[:j]))
    assert offsets[len(ids)] == len(prompt)


def test_logit_bias_and_penalties_through_the_api(tiny: Tiny) -> None:
    oa = tiny.client()
    forced = tiny.tok(" zebra")["input_ids"][0]
    out = oa.completions.create(
        model=tiny.name,
        prompt="Hello",
        max_tokens=3,
        temperature=0,
        logit_bias={str(forced): 100},
    )
    assert out.choices[0].text == text_of(tiny.tok, forced) * 3
    ids = tiny.tok("Hello")["input_ids"]
    out = oa.completions.create(
        model=tiny.name,
        prompt=ids,
        max_tokens=3,
        temperature=0,
        logprobs=1,
        extra_body={"frequency_penalty": 2.0, "presence_penalty": 0.5},
    )
    # the logprobs are after the penalties: a generated token costs 2 per count + 0.5
    lp = out.choices[0].logprobs
    got_ids: list[int] = []
    for i in range(3):
        row = tiny.log_softmax(ids + got_ids)[-1].clone()
        for t in set(got_ids):
            row[t] -= 2.0 * got_ids.count(t) + 0.5
        row = torch.log_softmax(row, -1)
        token = int(row.argmax())
        assert lp.tokens[i] == text_of(tiny.tok, token)
        assert abs(lp.token_logprobs[i] - row[token].item()) < TOL
        got_ids.append(token)
    assert len(set(got_ids)) == 3  # the penalty keeps the greedy from repeating
    with pytest.raises(BadRequestError, match="logit_bias"):
        oa.completions.create(model=tiny.name, prompt="Hi", logit_bias={"999999": 5})
    with pytest.raises(BadRequestError, match="min_tokens"):
        oa.completions.create(
            model=tiny.name, prompt="Hi", max_tokens=2, extra_body={"min_tokens": 5}
        )
    with pytest.raises(UnprocessableEntityError, match="presence_penalty"):
        oa.completions.create(model=tiny.name, prompt="Hi", presence_penalty=2.5)


def test_native_generate_logprobs(tiny: Tiny) -> None:
    ids = tiny.tok("Once upon")["input_ids"]
    want = tiny.greedy(ids, 4)
    lsm = tiny.log_softmax(ids + want)
    with tiny.live.client(tiny.key) as c:
        body = {"prompt": "Once upon", "max_new_tokens": 4, "logprobs": 2}
        r = c.post("/generate", json=body)
        assert r.status_code == 200, r.text
        got = r.json()["logprobs"]
        assert [g["token_id"] for g in got] == want
        for i, g in enumerate(got):
            assert abs(g["logprob"] - lsm[len(ids) - 1 + i, want[i]].item()) < TOL
            assert [t["token_id"] for t in g["top_logprobs"]] == lsm[len(ids) - 1 + i].topk(
                2
            ).indices.tolist()


def test_native_generate_streams_logprobs_per_token(tiny: Tiny) -> None:
    body = {"prompt": "Once upon", "max_new_tokens": 4, "logprobs": 1, "stream": True}
    with tiny.live.client(tiny.key) as c:
        plain = c.post("/generate", json={**body, "stream": False}).json()["logprobs"]
        with c.stream("POST", "/generate", json=body) as r:
            lines = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ")]
    tokens = [e for e in lines if e["type"] == "token"]
    assert [e["token_id"] for e in tokens] == [p["token_id"] for p in plain]
    assert [e["logprob"] for e in tokens] == [p["logprob"] for p in plain]
    assert [e["top_logprobs"] for e in tokens] == [p["top_logprobs"] for p in plain]


@pytest.mark.parametrize(
    "path,extra,field",
    [
        ("/v1/completions", {"frobnicate": 1}, "frobnicate"),
        ("/v1/chat/completions", {"frobnicate": 1}, "frobnicate"),
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        # this model's chat template ignores tools: it could never call one
        (
            "/v1/chat/completions",
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
        ),
        ("/v1/completions", {"suffix": "x"}, "suffix"),
        ("/v1/chat/completions", {"verbosity": "low"}, "verbosity"),
    ],
)
def test_unknown_and_unsupported_fields_are_refused_by_name(tiny, path, extra, field) -> None:
    body = {"model": tiny.name, "max_tokens": 1, **extra}
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    with tiny.live.client(tiny.key) as c:
        r = c.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert field in error["message"] and error["type"] == "invalid_request_error"


def test_harmless_fields_are_accepted(tiny: Tiny) -> None:
    body = {
        "model": tiny.name,
        "max_tokens": 1,
        "messages": [{"role": "user", "content": "hi"}],
        "user": "u-1",
        "metadata": {"a": "b"},
        "store": False,
        "service_tier": "auto",
        "prompt_cache_key": "k-1",
        "safety_identifier": "u-hash",
        "parallel_tool_calls": True,
        "response_format": {"type": "text"},
    }
    with tiny.live.client(tiny.key) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


def test_n_choices_are_the_seeded_requests_alone(tiny: Tiny) -> None:
    """n=3 with a seed: choice j is what the same request with seed + j gives alone."""
    oa = tiny.client()
    args = dict(model=tiny.name, prompt="Once upon a time", max_tokens=6, temperature=1.0)
    out = oa.completions.create(**args, n=3, seed=5)
    assert [c.index for c in out.choices] == [0, 1, 2]
    alone = [oa.completions.create(**args, seed=5 + j).choices[0].text for j in range(3)]
    assert [c.text for c in out.choices] == alone
    assert len(set(alone)) > 1
    assert out.usage.prompt_tokens == len(tiny.tok("Once upon a time")["input_ids"])
    assert out.usage.completion_tokens == 18


def test_best_of_returns_the_n_most_likely_of_its_candidates(tiny: Tiny) -> None:
    """best_of=4, n=2: the 2 of the 4 seeded candidates (the same as n=4) whose tokens'
    logprobs sum highest, best first; usage counts every candidate's tokens."""
    oa = tiny.client()
    args = dict(model=tiny.name, prompt=["Once upon a time", "Hi"], max_tokens=5, temperature=1.0)
    all4 = oa.completions.create(**args, n=4, seed=9, logprobs=0)
    out = oa.completions.create(**args, n=2, best_of=4, seed=9)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for p in range(2):
        cands = all4.choices[p * 4 : p * 4 + 4]
        ranked = sorted(cands, key=lambda c: sum(c.logprobs.token_logprobs), reverse=True)
        assert [c.text for c in out.choices[p * 2 : p * 2 + 2]] == [c.text for c in ranked[:2]]
        assert out.choices[p * 2].logprobs is None  # not asked for
    assert out.usage.completion_tokens == all4.usage.completion_tokens == 40
    with pytest.raises(UnprocessableEntityError, match="best_of must be >= n"):
        oa.completions.create(**args, n=3, best_of=2)
    with pytest.raises(UnprocessableEntityError, match="cannot be streamed"):
        oa.completions.create(**args, best_of=2, stream=True)


def test_several_prompts_and_n_stream_as_one(tiny: Tiny) -> None:
    oa = tiny.client()
    args = dict(model="eve", prompt=["Hello there", "Good night"], max_tokens=5, temperature=0)
    plain = oa.completions.create(**args, n=2, logprobs=1)
    chunks = list(oa.completions.create(**args, n=2, logprobs=1, stream=True))
    texts, tokens = {}, {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.logprobs:
                tokens[ch.index] = tokens.get(ch.index, []) + ch.logprobs.token_logprobs
    assert sorted(texts) == [0, 1, 2, 3]
    assert [texts[i] for i in range(4)] == [c.text for c in plain.choices]
    assert [tokens[i] for i in range(4)] == [c.logprobs.token_logprobs for c in plain.choices]
    assert plain.choices[0].text == plain.choices[1].text  # greedy: n identical choices
    msgs = [{"role": "user", "content": "Hi"}]
    stream = oa.chat.completions.create(
        model="eve",
        messages=msgs,
        max_tokens=4,
        temperature=0,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    finished = [ch.index for c in chunks for ch in c.choices if ch.finish_reason]
    assert sorted(finished) == [0, 1]
    assert chunks[-1].usage.completion_tokens == 8

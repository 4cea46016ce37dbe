"""The official ``openai`` client works unchanged against /v1."""

from __future__ import annotations

import pytest
from live import LiveServer, adapter_bytes, merged_greedy, random_adapter
from openai import OpenAI, PermissionDeniedError

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def dana(live: LiveServer, ref_vm):
    """A registered user with her own key and adapter."""
    key = live.new_user("dana")
    adapter = random_adapter(ref_vm, 21)
    with live.client(key) as c:
        r = c.put(
            "/users/dana/adapter",
            content=adapter_bytes(adapter),
            headers={"Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 201, r.text
    return key, adapter


def client(live: LiveServer, key: str) -> OpenAI:
    return OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0, timeout=300)


def test_completions_plain_and_streaming(live: LiveServer, ref_vm, dana) -> None:
    key, adapter = dana
    oa = client(live, key)
    prompt = "The capital of Italy is"
    ids = list(ref_vm.tokenizer(prompt)["input_ids"])
    want = ref_vm.tokenizer.decode(merged_greedy(ref_vm, adapter, ids, 8), skip_special_tokens=True)
    out = oa.completions.create(model="dana", prompt=prompt, max_tokens=8, temperature=0)
    assert out.choices[0].text == want
    assert out.usage.prompt_tokens == len(ids)
    chunks = list(
        oa.completions.create(model="dana", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_plain_and_streaming(live: LiveServer, ref_vm, dana) -> None:
    key, adapter = dana
    oa = client(live, key)
    msgs = [{"role": "user", "content": "Name a fruit."}]
    ids = list(
        ref_vm.tokenizer.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    want = ref_vm.tokenizer.decode(
        merged_greedy(ref_vm, adapter, ids, 10), skip_special_tokens=True
    )
    out = oa.chat.completions.create(model="dana", messages=msgs, max_tokens=10, temperature=0)
    assert out.choices[0].message.content == want
    assert out.choices[0].message.role == "assistant"
    stream = oa.chat.completions.create(
        model="dana",
        messages=msgs,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(ids)


def test_base_model_by_name_and_models_list(live: LiveServer, ref_vm, dana) -> None:
    key, _ = dana
    oa = client(live, key)
    out = oa.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    ids = list(ref_vm.tokenizer("Hello")["input_ids"])
    assert out.choices[0].text == ref_vm.tokenizer.decode(
        merged_greedy(ref_vm, None, ids, 4), skip_special_tokens=True
    )
    listed = {m.id for m in oa.models.list()}
    assert listed == {MODEL, "dana"}  # only what this key may use
    admin_listed = {m.id for m in client(live, live.admin_token).models.list()}
    assert {MODEL, "dana"} <= admin_listed


def test_other_users_model_is_forbidden(live: LiveServer, dana) -> None:
    key, _ = dana
    with pytest.raises(PermissionDeniedError):
        client(live, key).completions.create(model="alice", prompt="hi", max_tokens=2)


def test_prompts_with_one_preamble_share_it_and_answer_as_alone(
    live: LiveServer, ref_vm, dana
) -> None:
    """Three prompts of one request that begin with the same instructions: the preamble is
    computed once (the admin stats and the Prometheus counter grow by what was copied), and
    every answer is the one its prompt gets alone."""
    key, adapter = dana
    preamble = (
        "You are a careful assistant. Answer in one short sentence, plainly, and do not add "
        "any greeting or any explanation. Question: "
    )
    prompts = [preamble + q for q in ("What is ice?", "Where is Rome?", "Who wrote Hamlet?")]
    ids = [list(ref_vm.tokenizer(p)["input_ids"]) for p in prompts]

    def lcp(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    # each prompt copies from the earlier one it shares most with (its last token computed)
    copied = [min(max(lcp(ids[j], ids[i]) for i in range(j)), len(ids[j]) - 1) for j in (1, 2)]
    assert min(copied) >= 16

    def shared() -> tuple[int, float]:
        with live.client(live.admin_token) as c:
            stats = c.get("/admin/stats").json()["engine"]["shared_prompt_tokens"]
            metric = next(
                float(line.split()[-1])
                for line in c.get("/metrics").text.splitlines()
                if line.startswith("vera_shared_prompt_tokens_total")
            )
        return stats, metric

    before = shared()
    out = client(live, key).completions.create(
        model="dana", prompt=prompts, max_tokens=6, temperature=0
    )
    after = shared()
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    want = [
        ref_vm.tokenizer.decode(merged_greedy(ref_vm, adapter, p, 6), skip_special_tokens=True)
        for p in ids
    ]
    assert texts == want
    assert after[0] - before[0] == sum(copied)
    assert after[1] - before[1] == sum(copied)


def test_a_conversations_next_turn_restores_its_history(live: LiveServer, ref_vm, dana) -> None:
    """Turn 2 of a chat sends turn 1's messages, the reply and a new message: the history's
    K/V come from the prefix cache (at least turn 1's whole prompt; the usage says how many in
    ``prompt_tokens_details.cached_tokens``, as OpenAI's does), and the answer is the one the
    whole prompt gets computed from scratch."""
    key, adapter = dana
    oa = client(live, key)
    msgs = [{"role": "user", "content": "Name a colour you like, and say why."}]
    first = oa.chat.completions.create(model="dana", messages=msgs, max_tokens=8, temperature=0)
    msgs += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "And another one?"},
    ]

    def restored() -> tuple[int, float]:
        with live.client(live.admin_token) as c:
            stats = c.get("/admin/stats").json()["engine"]["prefix_cache"]["hit_tokens"]
            metric = next(
                float(line.split()[-1])
                for line in c.get("/metrics").text.splitlines()
                if line.startswith("vera_prefix_cache_hit_tokens_total")
            )
        return stats, metric

    def chat_ids(messages: list[dict]) -> list[int]:
        return list(
            ref_vm.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )

    before = restored()
    second = oa.chat.completions.create(model="dana", messages=msgs, max_tokens=8, temperature=0)
    after = restored()
    want = merged_greedy(ref_vm, adapter, chat_ids(msgs), 8)
    assert second.choices[0].message.content == ref_vm.tokenizer.decode(
        want, skip_special_tokens=True
    )
    turn1 = len(chat_ids(msgs[:1]))
    assert turn1 <= after[0] - before[0] < len(chat_ids(msgs))
    assert after[1] - before[1] == after[0] - before[0]
    details = second.usage.prompt_tokens_details if second.usage else None
    assert details is not None and details.cached_tokens == after[0] - before[0]
    assert first.usage and first.usage.prompt_tokens_details  # at most a system prompt
    assert (first.usage.prompt_tokens_details.cached_tokens or 0) < turn1 - 8  # of earlier chats

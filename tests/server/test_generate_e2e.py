"""End to end over HTTP on the real default model: per-user greedy tokens equal transformers'
``generate`` with that user's vectors merged into the weights."""

from __future__ import annotations

import asyncio
import json

import httpx
from live import LiveServer, adapter_bytes, merged_greedy, peft_zip, random_adapter

OCTET = {"Content-Type": "application/octet-stream"}
ZIP = {"Content-Type": "application/zip"}
QUESTIONS = [
    "Tell me about your favourite place.",
    "What should I cook tonight?",
    "Give me one tip for learning Python.",
    "Describe the sea in a sentence.",
]


def chat_ids(vm, text: str) -> list[int]:
    return list(
        vm.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
    )


def stream_events(client: httpx.Client, body: dict) -> list[dict]:
    events = []
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def test_two_users_get_their_merged_model_tokens(live: LiveServer, ref_vm, tmp_path) -> None:
    alice, bob = random_adapter(ref_vm, 1), random_adapter(ref_vm, 2)
    with live.admin() as c:
        r = c.put("/users/alice/adapter", content=adapter_bytes(alice), headers=OCTET)
        assert r.status_code == 201, r.text
        assert r.json()["num_params"] == ref_vm.layout.num_params
        r = c.put("/users/bob/adapter", content=peft_zip(bob, ref_vm, tmp_path), headers=ZIP)
        assert r.status_code == 201, r.text
        prompt = QUESTIONS[0]
        ids = chat_ids(ref_vm, prompt)
        texts = {}
        for user, adapter in (("alice", alice), ("bob", bob), (None, None)):
            body = {"messages": [{"role": "user", "content": prompt}], "max_new_tokens": 12}
            if user:
                body["user_id"] = user
            expected = merged_greedy(ref_vm, adapter, ids, 12)
            events = stream_events(c, body)
            got = [e["token_id"] for e in events if e["type"] == "token"]
            assert got == expected, f"{user}: {got} != {expected}"
            texts[user] = c.post("/generate", json=body).json()["text"]
            assert texts[user] == ref_vm.tokenizer.decode(expected, skip_special_tokens=True)
    assert len(set(texts.values())) == 3, "adapters must change the output"


def test_sixteen_users_in_flight_all_match(live: LiveServer, ref_vm) -> None:
    users = {f"u{i:02d}": random_adapter(ref_vm, 100 + i) for i in range(16)}
    with live.admin() as c:
        for uid, adapter in users.items():
            assert (
                c.put(
                    f"/users/{uid}/adapter", content=adapter_bytes(adapter), headers=OCTET
                ).status_code
                == 201
            )
    prompts = {uid: QUESTIONS[i % len(QUESTIONS)] for i, uid in enumerate(users)}

    async def run_all() -> dict[str, dict]:
        headers = {"Authorization": f"Bearer {live.admin_token}"}
        async with httpx.AsyncClient(base_url=live.url, headers=headers, timeout=600) as ac:

            async def one(uid: str) -> dict:
                body = {
                    "user_id": uid,
                    "max_new_tokens": 10,
                    "messages": [{"role": "user", "content": prompts[uid]}],
                }
                r = await ac.post("/generate", json=body)
                assert r.status_code == 200, r.text
                return r.json()

            results = await asyncio.gather(*(one(u) for u in users))
        return dict(zip(users, results))

    results = asyncio.run(run_all())
    for uid, adapter in users.items():
        expected = merged_greedy(ref_vm, adapter, chat_ids(ref_vm, prompts[uid]), 10)
        want = ref_vm.tokenizer.decode(expected, skip_special_tokens=True)
        assert results[uid]["text"] == want, uid
        assert results[uid]["adapter_version"] == 1
        assert results[uid]["usage"]["completion_tokens"] == len(expected) + (
            results[uid]["finish_reason"] == "stop"
        )


def test_streaming_equals_non_streaming(live: LiveServer, ref_vm) -> None:
    adapter = random_adapter(ref_vm, 7)
    with live.admin() as c:
        c.put("/users/streamer/adapter", content=adapter_bytes(adapter), headers=OCTET)
        body = {
            "user_id": "streamer",
            "prompt": "The three best things about autumn are",
            "max_new_tokens": 16,
        }
        plain = c.post("/generate", json=body).json()
        events = stream_events(c, body)
    assert events[-1]["type"] == "done"
    assert "".join(e["text"] for e in events if e["type"] == "token") == plain["text"]
    assert events[-1]["finish_reason"] == plain["finish_reason"]
    assert events[-1]["usage"] == plain["usage"]


def test_upload_inspect_delete_and_versions(live: LiveServer, ref_vm) -> None:
    first, second = random_adapter(ref_vm, 11), random_adapter(ref_vm, 12)
    body = {"user_id": "carol", "prompt": "My name is", "max_new_tokens": 8}
    with live.admin() as c:
        assert (
            c.put("/users/carol/adapter", content=adapter_bytes(first), headers=OCTET).json()[
                "version"
            ]
            == 1
        )
        meta = c.get("/users/carol/adapter").json()
        assert meta["version"] == 1 and meta["num_params"] == ref_vm.layout.num_params
        assert len(meta["sha256"]) == 64
        out1 = c.post("/generate", json=body).json()
        assert (
            c.put("/users/carol/adapter", content=adapter_bytes(second), headers=OCTET).json()[
                "version"
            ]
            == 2
        )
        out2 = c.post("/generate", json=body).json()
        assert out2["adapter_version"] == 2 and out1["adapter_version"] == 1
        ids = list(ref_vm.tokenizer("My name is")["input_ids"])
        assert out2["text"] == ref_vm.tokenizer.decode(
            merged_greedy(ref_vm, second, ids, 8), skip_special_tokens=True
        )
        assert c.delete("/users/carol/adapter").status_code == 204
        assert c.get("/users/carol/adapter").status_code == 404
        r = c.post("/generate", json=body)
        assert r.status_code == 404 and "no adapter" in r.json()["error"]["message"]
        assert c.delete("/users/carol/adapter").status_code == 404

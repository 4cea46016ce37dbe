"""Structured output and tool calls through /v1 with the official ``openai`` client: its
``parse`` helper gets valid objects for 8 users with 8 schemas at once; forced tool calls
always parse and match their tool's parameters; refusals say what is wrong."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import jsonschema
import pytest
from live import LiveServer, adapter_bytes, build_tiny_model, random_adapter, start_server
from openai import AsyncOpenAI, BadRequestError, OpenAI
from pydantic import BaseModel, Field
from transformers import AutoTokenizer

from server.api.schemas import closed
from server.api.tools import parse_hermes

Name = Field(max_length=24)


class Person(BaseModel):
    name: str = Name
    age: int = Field(ge=0, le=120)


class City(BaseModel):
    city: Literal["Paris", "Tokyo", "Lima"]
    population_millions: int = Field(ge=0, le=50)


class Steps(BaseModel):
    steps: list[str] = Field(max_length=3)


class Color(BaseModel):
    name: str = Name
    warm: bool


class Book(BaseModel):
    title: str = Name
    year: int = Field(ge=1000, le=2100)


class Pet(BaseModel):
    species: Literal["cat", "dog", "fish"]
    name: str = Name


class Owner(BaseModel):
    owner: Person
    pets: list[Pet] = Field(max_length=2)


class Weather(BaseModel):
    sunny: bool
    celsius: int = Field(ge=-50, le=60)


SCHEMAS: list[type[BaseModel]] = [Person, City, Steps, Color, Book, Pet, Owner, Weather]


@pytest.fixture(scope="module")
def users(live: LiveServer, ref_vm) -> list[tuple[str, str]]:
    """8 users, each with a key and an adapter of their own."""
    out = []
    for i in range(len(SCHEMAS)):
        user = f"shape{i}"
        key = live.new_user(user)
        with live.client(key) as c:
            r = c.put(
                f"/users/{user}/adapter",
                content=adapter_bytes(random_adapter(ref_vm, 100 + i, scale=0.3)),
                headers={"Content-Type": "application/octet-stream"},
            )
            assert r.status_code == 201, r.text
        out.append((user, key))
    return out


def test_parse_helper_gives_8_users_8_schemas_in_one_batch(live: LiveServer, users) -> None:
    async def ask(user: str, key: str, schema: type[BaseModel]):
        oa = AsyncOpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0, timeout=300)
        out = await oa.chat.completions.parse(
            model=user,
            messages=[{"role": "user", "content": f"Give an example {schema.__name__}."}],
            response_format=schema,
            max_tokens=150,
            temperature=0,
        )
        return out.choices[0]

    async def all_at_once():
        return await asyncio.gather(
            *(ask(u, k, s) for (u, k), s in zip(users, SCHEMAS, strict=True))
        )

    for choice, schema in zip(asyncio.run(all_at_once()), SCHEMAS):
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, schema), choice.message.content


def test_json_object_mode_streamed_and_not(live: LiveServer, users) -> None:
    user, key = users[0]
    oa = OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0, timeout=300)
    kw = dict(
        model=user,
        messages=[{"role": "user", "content": "Describe your day as JSON."}],
        response_format={"type": "json_object"},
        max_tokens=60,
        temperature=0,
    )
    out = oa.chat.completions.create(**kw)
    text = out.choices[0].message.content
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")
    chunks = oa.chat.completions.create(**kw, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_native_generate_and_legacy_completions_take_a_schema(live: LiveServer, users) -> None:
    user, key = users[1]
    schema = City.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    with live.client(key) as c:
        r = c.post(
            "/generate",
            json={
                "user_id": user,
                "prompt": "A city:",
                "response_format": fmt,
                "max_new_tokens": 40,
            },
        )
        assert r.status_code == 200, r.text
        City.model_validate_json(r.json()["text"])
    oa = OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0, timeout=300)
    out = oa.completions.create(
        model=user,
        prompt="A city:",
        max_tokens=40,
        temperature=0,
        extra_body={"response_format": fmt},
    )
    City.model_validate_json(out.choices[0].text)


def test_bad_formats_and_tools_without_a_template_are_400(live: LiveServer, users) -> None:
    user, key = users[2]
    oa = OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0, timeout=300)
    msgs = [{"role": "user", "content": "hi"}]
    missing = {"name": "x", "schema": {"$ref": "#/$defs/nowhere"}}
    with pytest.raises(BadRequestError, match="nowhere"):
        oa.chat.completions.create(
            model=user,
            messages=msgs,
            response_format={"type": "json_schema", "json_schema": missing},
        )
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(BadRequestError, match="does not render 'tools'"):
        oa.chat.completions.create(model=user, messages=msgs, tools=[tool])
    with pytest.raises(BadRequestError, match="functions"):
        oa.chat.completions.create(
            model=user, messages=msgs, extra_body={"functions": [tool["function"]]}
        )
    health = OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0)
    assert health.chat.completions.create(model=user, messages=msgs, max_tokens=2).choices


# -- tools, on a tiny model whose template renders them (the Hermes <tool_call> format) ------

HERMES = """{%- if tools %}<|im_start|>system
Tools:
{% for t in tools %}{{ t | tojson }}
{% endfor %}Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}{% for m in messages %}{% if m.role == "tool" and not m.tool_call_id %}\
{{ raise_exception("a tool message needs its tool_call_id") }}{% endif %}<|im_start|>{{ m.role }}
{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>\
{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Tokyo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def hermes(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("tools")
    folder = build_tiny_model(tmp / "tiny-hermes")
    (folder / "chat_template.jinja").write_text(HERMES)
    server = start_server(tmp, "--model", str(folder), "--max-seq-len", "512", admin_token=None)
    yield server, AutoTokenizer.from_pretrained(folder), folder.name
    server.stop()


def check_call(call, tools: list[dict]) -> None:
    fn = {t["function"]["name"]: t["function"] for t in tools}[call.function.name]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, {**fn["parameters"], "additionalProperties": False})
    assert call.type == "function" and call.id.startswith("call_")


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_calls_always_parse(hermes, stream: bool) -> None:
    server, _, name = hermes
    oa = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, parallel, tools in [
        (named, None, [WEATHER, TIME]),
        ("required", False, [TIME, WEATHER]),
    ]:
        kw = dict(model=name, messages=msgs, tools=tools, tool_choice=choice, max_tokens=80)
        if parallel is not None:
            kw["parallel_tool_calls"] = parallel
        for seed in range(3):
            kw.update(temperature=1.0, seed=seed)
            if stream:
                chunks = list(oa.chat.completions.create(**kw, stream=True))
                calls = [c for ch in chunks for c in ch.choices[0].delta.tool_calls or []]
                finish = chunks[-1].choices[0].finish_reason
            else:
                out = oa.chat.completions.create(**kw)
                calls, finish = out.choices[0].message.tool_calls, out.choices[0].finish_reason
            assert finish == "tool_calls" and len(calls) == 1
            if choice is named:
                assert calls[0].function.name == "get_weather"
            check_call(calls[0], tools)


def test_tool_messages_reach_the_template_and_errors_name_the_problem(hermes) -> None:
    server, tok, name = hermes
    oa = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'},
    }
    msgs = [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    out = oa.chat.completions.create(model=name, messages=msgs, tools=[TIME], max_tokens=3)
    local = dict(
        msgs[1],
        tool_calls=[{**call, "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}],
    )
    want = tok.apply_chat_template(
        [msgs[0], local, msgs[2]], tools=[TIME], add_generation_prompt=True, return_dict=False
    )
    assert out.usage.prompt_tokens == len(want)
    assert "get_time" in tok.decode(want) and "12:00" in tok.decode(want)
    auto = oa.chat.completions.create(model=name, messages=msgs, tools=[TIME], max_tokens=5)
    assert auto.choices[0].finish_reason in ("stop", "length")  # free text: no call read
    assert auto.choices[0].message.content is not None
    unknown = {"type": "function", "function": {"name": "nope"}}
    with pytest.raises(BadRequestError, match="'nope'"):
        oa.chat.completions.create(model=name, messages=msgs, tools=[TIME], tool_choice=unknown)
    with pytest.raises(BadRequestError, match="needs 'tools'"):
        oa.chat.completions.create(model=name, messages=msgs, tool_choice="required")
    with pytest.raises(BadRequestError, match="min_tokens"):
        oa.chat.completions.create(
            model=name,
            messages=msgs,
            tools=[TIME],
            tool_choice="required",
            extra_body={"min_tokens": 2},
        )
    orphan = [*msgs[:2], {"role": "tool", "content": "12:00"}]  # the template refuses it
    with pytest.raises(BadRequestError, match="needs its tool_call_id"):
        oa.chat.completions.create(model=name, messages=orphan, tools=[TIME])


def test_hermes_blocks_become_tool_calls() -> None:
    text = (
        'Let me check.<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    )
    content, calls = parse_hermes(text + "<tool_call>not json</tool_call>")
    assert content == "Let me check.<tool_call>not json</tool_call>"
    assert [c["function"]["name"] for c in calls] == ["get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"zone": "CET"}
    assert parse_hermes("plain answer") == ("plain answer", [])


def test_strict_closes_every_object_schema_and_nothing_else() -> None:
    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"a": {"type": "string"}}},
            "open": {"type": "object", "properties": {}, "additionalProperties": True},
            "list": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
        },
        "$defs": {
            "Item": {"anyOf": [{"type": "object", "properties": {"b": {}}}, {"type": "null"}]}
        },
    }
    out = closed(schema)
    assert out["additionalProperties"] is False
    inner = out["properties"]["properties"]
    assert (
        inner["additionalProperties"] is False and "additionalProperties" not in inner["properties"]
    )
    assert out["properties"]["open"]["additionalProperties"] is True  # said otherwise: kept
    assert out["$defs"]["Item"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the input is not changed

"""Training data is checked line by line with messages that name the line and never quote it;
over-long examples are refused, never cut."""

from __future__ import annotations

import json

import pytest

from vera_core.train_data import (
    IGNORE,
    DataLimits,
    TrainingDataError,
    encode_example,
    encode_rows,
    parse_jsonl,
    rows_of,
)

LIMITS = DataLimits(max_bytes=10_000, max_examples=5, max_example_tokens=64, max_total_tokens=200)
SECRET = "Zanzibar-7731"  # stands for private training data: must never appear in a message


def chat(answer: str = f"Your code is {SECRET}.") -> dict:
    return {
        "messages": [
            {"role": "user", "content": "What is my code?"},
            {"role": "assistant", "content": answer},
        ]
    }


def jsonl(*rows: object) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


def problem(content: bytes) -> str:
    with pytest.raises(TrainingDataError) as e:
        parse_jsonl(content, LIMITS)
    assert SECRET not in str(e.value)
    return str(e.value)


def test_good_files_parse_with_line_numbers() -> None:
    rows = parse_jsonl(
        jsonl(chat(), "", {"prompt": "Q: code?\nA:", "completion": f" {SECRET}"}), LIMITS
    )
    assert [r.line for r in rows] == [1, 3]


@pytest.mark.parametrize(
    "rows,expected",
    [
        (
            (chat(), f'{{"messages": [{{"role": "user", "content": "{SECRET}"'),
            "line 2: not valid JSON",
        ),
        ((chat(), [1, 2]), "line 2: each line must be a JSON object"),
        (({"text": SECRET},), "line 1: each example needs 'messages'"),
        (({"messages": []},), "line 1: 'messages' must be a non-empty list"),
        (({"messages": [{"role": "user", "content": SECRET}]},), "line 1: the last message"),
        (({"messages": [{"role": "robot", "content": SECRET}]},), "line 1: messages[0] needs"),
        (({"messages": [{"role": "user", "content": 5}]},), "line 1: messages[0] needs 'content'"),
        (({"prompt": SECRET},), "line 1: 'prompt' and 'completion' must both be strings"),
        (({"prompt": SECRET, "completion": ""},), "line 1: 'completion' is empty"),
    ],
)
def test_bad_lines_are_named(rows, expected) -> None:
    assert problem(jsonl(*rows)).startswith(expected)


def test_empty_oversized_and_binary_files() -> None:
    assert "no examples" in problem(b"")
    assert "no examples" in problem(b"\n  \n")
    assert "bytes; the limit is 10000" in problem(b"x" * 10_001)
    assert "not UTF-8" in problem(b"\xff\xfe" + SECRET.encode())
    assert "more than 5 examples" in problem(jsonl(*[chat()] * 6))


def test_token_limits_name_the_line(default_model_files) -> None:
    _, tok, _ = default_model_files
    long = chat("word " * 100)
    with pytest.raises(TrainingDataError, match=r"line 2: the example is \d+ tokens; the limit"):
        encode_rows(parse_jsonl(jsonl(chat(), long), LIMITS), tok, LIMITS)
    many = DataLimits(10_000, 100, 64, max_total_tokens=100)
    with pytest.raises(TrainingDataError, match="more than 100 tokens"):
        encode_rows(parse_jsonl(jsonl(*[chat()] * 5), many), tok, many)
    examples = encode_rows(parse_jsonl(jsonl(chat()), LIMITS), tok, LIMITS)
    taught = [t for t, lab in zip(examples[0].input_ids, examples[0].labels) if lab != IGNORE]
    assert SECRET in tok.decode(taught)


def test_in_memory_examples_are_checked_like_lines() -> None:
    assert [r.line for r in rows_of([chat(), chat()])] == [1, 2]
    with pytest.raises(TrainingDataError, match="line 2: the last message") as e:
        rows_of([chat(), {"messages": [{"role": "user", "content": SECRET}]}])
    assert SECRET not in str(e.value)


def test_labels_cover_only_the_completion(default_model_files) -> None:
    _, tok, _ = default_model_files
    ex = encode_example(chat(), tok)
    taught = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
    assert SECRET in taught and "What is my code?" not in taught  # the question is not taught
    ex = encode_example({"prompt": "Q: hi\nA:", "completion": " hello"}, tok)
    taught = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
    assert taught.startswith(" hello") and ex.input_ids[-1] == tok.eos_token_id

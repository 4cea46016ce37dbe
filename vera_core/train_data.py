"""Training data: JSONL checked line by line, then tokenized into examples. The one pipeline
of every trainer: the ``vera-serve train`` command, fine-tuning jobs, the benchmarks.

A file holds one example per line, OpenAI's chat format (``{"messages": [...]}`` ending with an
assistant turn) or ``{"prompt": ..., "completion": ...}``; loss is taken on the completion (the
last assistant turn) only. Every problem is reported with its 1-based line number and what is
wrong, never with the line's content: training data stays out of errors, events and logs.

Over-long examples are refused, never cut: an example longer than ``max_example_tokens`` (the
model's context, for the server) is an error naming its line. A cut example would teach a
truncated answer, and a trainer cannot tell which part of it mattered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vera_core.errors import VeraError

IGNORE = -100  # label of a token that is not trained on (prompt, padding)

_ROLES = ("system", "user", "assistant", "developer", "tool")


class TrainingDataError(VeraError, ValueError):
    """Training data that cannot be trained on; the message names the line and problem."""


@dataclass(frozen=True)
class DataLimits:
    max_bytes: int  # the file
    max_examples: int
    max_example_tokens: int  # one example, prompt + completion: longer ones are refused
    max_total_tokens: int  # the whole file

    @classmethod
    def offline(cls, max_example_tokens: int) -> DataLimits:
        """An offline trainer's limits: examples must fit the context, nothing else bounded
        (a server bounds what one tenant may send: its flags)."""
        return cls(1 << 40, 1 << 40, max_example_tokens, 1 << 40)


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line of the file
    data: dict[str, Any]


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens


def read_examples(content: bytes, tokenizer: Any, limits: DataLimits) -> list[Example]:
    """A JSONL file's bytes -> examples; TrainingDataError names the first bad line."""
    return encode_rows(parse_jsonl(content, limits), tokenizer, limits)


def examples_of(records: list[dict[str, Any]], tokenizer: Any, limits: DataLimits) -> list[Example]:
    """In-memory examples (one dict per line of a file) -> examples, checked the same way."""
    return encode_rows(rows_of(records), tokenizer, limits)


def parse_jsonl(content: bytes, limits: DataLimits) -> list[Row]:
    """Check a training file's syntax and shape; raise TrainingDataError naming the line."""
    if len(content) > limits.max_bytes:
        raise TrainingDataError(
            f"the file is {len(content)} bytes; the limit is {limits.max_bytes} bytes"
        )
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrainingDataError(f"the file is not UTF-8 text (byte {e.start})") from None
    rows: list[Row] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainingDataError(f"line {number}: not valid JSON ({e.msg})") from None
        problem = _shape_problem(data)
        if problem:
            raise TrainingDataError(f"line {number}: {problem}")
        rows.append(Row(number, data))
        if len(rows) > limits.max_examples:
            raise TrainingDataError(
                f"the file has more than {limits.max_examples} examples (the limit)"
            )
    if not rows:
        raise TrainingDataError("the file holds no examples (one JSON object per line)")
    return rows


def _shape_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return "each line must be a JSON object"
    if "messages" in data:
        messages = data["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _ROLES:
                return f"messages[{i}] needs a 'role' among {', '.join(_ROLES)}"
            if not isinstance(m.get("content"), str):
                return f"messages[{i}] needs 'content' as a string"
        if messages[-1]["role"] != "assistant":
            return "the last message must be the assistant's (the answer to learn)"
        return None
    if "prompt" in data or "completion" in data:
        if not isinstance(data.get("prompt"), str) or not isinstance(data.get("completion"), str):
            return "'prompt' and 'completion' must both be strings"
        if not data["completion"]:
            return "'completion' is empty: nothing to learn"
        return None
    return "each example needs 'messages' (chat) or 'prompt' and 'completion'"


def rows_of(records: list[dict[str, Any]]) -> list[Row]:
    """In-memory examples as rows (line = 1-based position), checked like a file's lines."""
    rows = []
    for number, data in enumerate(records, 1):
        problem = _shape_problem(data)
        if problem:
            raise TrainingDataError(f"line {number}: {problem}")
        rows.append(Row(number, data))
    if not rows:
        raise TrainingDataError("no examples")
    return rows


def encode_rows(rows: list[Row], tokenizer: Any, limits: DataLimits) -> list[Example]:
    """Tokenize every row; too-long examples and too many tokens raise TrainingDataError."""
    examples: list[Example] = []
    total = 0
    for row in rows:
        try:
            example = encode_example(row.data, tokenizer)
        except Exception as e:  # the chat template refusing a conversation, and the like
            raise TrainingDataError(f"line {row.line}: {_describe(e)}") from None
        n = len(example.input_ids)
        if n > limits.max_example_tokens:
            raise TrainingDataError(
                f"line {row.line}: the example is {n} tokens; the limit is "
                f"{limits.max_example_tokens}"
            )
        total += n
        if total > limits.max_total_tokens:
            raise TrainingDataError(
                f"the file has more than {limits.max_total_tokens} tokens (the limit)"
            )
        examples.append(example)
    return examples


def encode_example(row: dict[str, Any], tokenizer: Any) -> Example:
    """Tokenize one checked row; labels mask everything but the completion / last assistant
    turn (a chat's prompt is rendered with the generation prompt, as at serving time)."""
    if "messages" in row:
        messages = row["messages"]
        prompt_ids = tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        full_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        if list(full_ids[: len(prompt_ids)]) != list(prompt_ids):
            raise ValueError("chat template renders the prompt differently inside the full chat")
    else:
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        full_ids = list(prompt_ids) + list(completion) + [tokenizer.eos_token_id]
    full_ids = list(full_ids)
    return Example(full_ids, [IGNORE] * len(prompt_ids) + full_ids[len(prompt_ids) :])


def _describe(e: Exception) -> str:
    """An error's kind and message without echoing data (template errors can quote it)."""
    if isinstance(e, ValueError) and "renders the prompt differently" in str(e):
        return str(e)
    return f"the example cannot be rendered with the model's chat template ({type(e).__name__})"

"""Training files: JSONL checked line by line, then tokenized into examples.

A file holds one example per line, OpenAI's chat format (``{"messages": [...]}`` ending with an
assistant turn) or ``{"prompt": ..., "completion": ...}``. Every problem is reported with its
1-based line number and what is wrong, never with the line's content: training data stays out of
errors, events and logs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from vera_core.train import Example, encode_example

_ROLES = ("system", "user", "assistant", "developer", "tool")


class TrainingDataError(ValueError):
    """A training file that cannot be trained on; the message names the line and problem."""


@dataclass(frozen=True)
class DataLimits:
    max_bytes: int
    max_examples: int
    max_example_tokens: int  # one example, prompt + completion
    max_total_tokens: int  # the whole file


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line of the file
    data: dict[str, Any]


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


def encode_rows(
    rows: list[Row], tokenizer: PreTrainedTokenizerBase, limits: DataLimits
) -> list[Example]:
    """Tokenize every row; too-long examples and a too-large file raise TrainingDataError."""
    examples: list[Example] = []
    total = 0
    for row in rows:
        try:
            example = encode_example(row.data, tokenizer, max_length=10**9)
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


def _describe(e: Exception) -> str:
    """An error's kind and message without echoing data (template errors can quote it)."""
    if isinstance(e, ValueError) and "example must end" in str(e):
        return str(e)
    return f"the example cannot be rendered with the model's chat template ({type(e).__name__})"

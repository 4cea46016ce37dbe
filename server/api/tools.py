"""Tool calling on /v1/chat/completions: ``tools``, ``tool_choice`` and ``tool_calls``.

The tools are rendered into the prompt by the model's chat template; a template that ignores
them (the output is the same with and without) is refused with a 400, since the model would
never learn they exist. How the answer becomes ``tool_calls`` depends on ``tool_choice``:

* ``"required"`` or a named function: the output is constrained by a grammar (as structured
  output is), so it always parses: the named function's ``arguments`` object, or for
  ``"required"`` a JSON array of ``{"name", "arguments"}`` (one item unless
  ``parallel_tool_calls``), each item's arguments matching that tool's ``parameters``.
* ``"auto"`` (the default with tools): the model writes freely; ``<tool_call>{...}</tool_call>``
  blocks (the Hermes format that Qwen, SmolLM3, Hermes and others use) become ``tool_calls``,
  the rest is ``content``. A template without that format cannot be parsed: 400, asking for
  ``"required"`` or a named function.
* ``"none"``: the tools are rendered, the answer is text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedTokenizerBase

from server.api.errors import ApiError
from server.api.schemas import OPENAI_NAME_PATTERN, closed
from server.engine.grammar import json_schema_grammar

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_HERMES_MARK = "<tool_call>"
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=OPENAI_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class ToolChoiceNamed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | ToolChoiceNamed


@dataclass(frozen=True)
class ToolPlan:
    """How one request uses its tools: what the prompt renders, the grammar the output must
    match (None: free text), and how the output is read back."""

    tools: list[dict[str, Any]]  # as the chat template takes them
    choice: str  # "none" | "auto" | "required" | "named"
    grammar: str | None
    named: str | None = None

    def read(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The finished output -> (content, tool_calls)."""
        if self.choice == "none":
            return text, []
        if self.choice == "named":
            return None, [_call(self.named or "", json.loads(text))]
        if self.choice == "required":
            return None, [_call(c["name"], c["arguments"]) for c in json.loads(text)]
        return parse_hermes(text)


def plan(
    tools: list[Tool] | None,
    choice: ToolChoice | None,
    parallel: bool | None,
    tok: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
) -> ToolPlan | None:
    """The request's tool plan (None without tools); raises ApiError(400) saying what is
    wrong: a choice without tools, an unknown function, a template that cannot do it."""
    if not tools:
        if choice not in (None, "none"):
            raise ApiError(400, "'tool_choice' needs 'tools'")
        return None
    rendered = [t.model_dump(exclude_none=True) for t in tools]
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise ApiError(400, "tools: function names must be unique")
    template = renders_tools(tok, messages, rendered)
    if template is None:
        raise ApiError(
            400, "this model's chat template does not render 'tools': it cannot call them"
        )
    schemas = {t.function.name: _parameters(t.function) for t in tools}
    if isinstance(choice, ToolChoiceNamed):
        name = choice.function.name
        if name not in schemas:
            raise ApiError(400, f"tool_choice names {name!r}, which is not in 'tools'")
        return ToolPlan(rendered, "named", json_schema_grammar(schemas[name]), name)
    if choice == "required":
        item = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": n}, "arguments": s},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for n, s in schemas.items()
            ]
        }
        array = {"type": "array", "items": item, "minItems": 1}
        if parallel is False:
            array["maxItems"] = 1
        return ToolPlan(rendered, "required", json_schema_grammar(array))
    if choice == "none":
        return ToolPlan(rendered, "none", None)
    if _HERMES_MARK not in template:
        raise ApiError(
            400,
            "tool_choice 'auto' needs a chat template whose tool calls this server can read "
            "(<tool_call> blocks); use tool_choice 'required' or name a function",
        )
    return ToolPlan(rendered, "auto", None)


def renders_tools(
    tok: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> str | None:
    """The chat template's source if rendering ``tools`` changes the prompt, else None."""
    template = getattr(tok, "chat_template", None)
    if not template:
        return None

    def render(**kw: Any) -> str:
        return str(tok.apply_chat_template(messages, tokenize=False, **kw))

    try:
        if render(tools=tools) == render():
            return None
    except TemplateError as e:
        raise ApiError(400, f"the chat template cannot render these tools: {e}") from None
    return template if isinstance(template, str) else json.dumps(template)


def parse_hermes(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks -> tool calls; the
    text outside them is the content (None when empty). A block that is not such JSON stays
    in the content."""
    calls, kept, at = [], [], 0
    for m in _HERMES.finditer(text):
        try:
            body = json.loads(m.group(1))
            name, args = body["name"], body.get("arguments", body.get("parameters", {}))
        except (ValueError, KeyError, TypeError):
            continue
        if not isinstance(name, str):
            continue
        calls.append(_call(name, args))
        kept.append(text[at : m.start()])
        at = m.end()
    kept.append(text[at:])
    content = "".join(kept).strip()
    return (content or None), calls


def _parameters(fn: FunctionDef) -> dict[str, Any]:
    """The arguments' schema; ``strict`` closes its objects as OpenAI does."""
    schema = fn.parameters or _ANY_OBJECT
    return closed(schema) if fn.strict else schema


def _call(name: str, arguments: Any) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }

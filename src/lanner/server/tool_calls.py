"""Tools in ``/v1/chat/completions``: what ``tools`` and ``tool_choice`` do to
the prompt, to decoding, and to the answer.

- ``auto``: the tools are described in the prompt in the model's own tool-call
  syntax (``lanner.chat.toolcalls``); the answer is split into content and calls.
- ``none``: no tools are offered and the answer is plain text.
- ``required`` or a named function: offered as for ``auto``, and the output is
  constrained (a Lark grammar run by llguidance) to be exactly one call, written
  in the syntax's call markers, to one of the allowed functions, with arguments
  that validate against that function's parameter schema.

A request with neither tools nor earlier tool calls takes the plain chat path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from lanner.chat.toolcalls import (
    ContentDelta,
    StreamParser,
    ToolCall,
    ToolCallDelta,
    ToolSyntax,
    syntax_for,
)
from lanner.engine import constrain
from lanner.engine.model import Model
from lanner.engine.types import Constraint, Request
from lanner.errors import InvalidRequest
from lanner.server import protocol as p
from lanner.tools.loop import tool_request

Mode = Literal["none", "auto", "required", "named"]

NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {},
                                 "additionalProperties": False}
"""The schema of a function given without ``parameters``: it takes none."""
# The JSON layout constrain.json_schema uses too: no free whitespace, because
# small models otherwise wander off into endless newlines inside the JSON.
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ToolChoice:
    """A chat request's tools, validated, and what it asks of them."""

    tools: list[dict[str, Any]] = field(default_factory=list)
    """OpenAI ``tools`` entries, each with its ``parameters`` filled in."""
    mode: Mode = "none"
    name: str | None = None
    """The function a named ``tool_choice`` forces."""
    parallel: bool = True
    """False: at most one call per answer."""

    @property
    def offered(self) -> list[dict[str, Any]] | None:
        """The tools to describe in the prompt (None: offer none)."""
        return self.tools if self.mode != "none" and self.tools else None

    @property
    def parses(self) -> bool:
        """Whether the answer is split into content and calls."""
        return self.offered is not None

    @property
    def forced(self) -> list[dict[str, Any]]:
        """The tools one of which the output must call ([] if none is forced)."""
        if self.mode == "required":
            return self.tools
        if self.mode == "named":
            return [t for t in self.tools if t["function"]["name"] == self.name]
        return []


def tool_choice(req: p.ChatCompletionRequest) -> ToolChoice | None:
    """The request's tools and tool_choice, checked (InvalidRequest naming the
    field); None when it neither gives tools nor carries earlier tool calls."""
    tools = [_tool_entry(tool, i) for i, tool in enumerate(req.tools or [])]
    history = any(m.tool_calls for m in req.messages)
    if not tools and not history and req.tool_choice in (None, "none", "auto"):
        return None
    names = [t["function"]["name"] for t in tools]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise InvalidRequest("tools", f"two tools are named {twice!r}")
    choice = req.tool_choice or ("auto" if tools else "none")
    mode: Mode = "named" if isinstance(choice, p.NamedToolChoice) else choice
    name = choice.function.name if isinstance(choice, p.NamedToolChoice) else None
    if mode in ("required", "named") and not tools:
        raise InvalidRequest("tool_choice", f"{mode!r} needs tools, and none were given")
    if name is not None and name not in names:
        raise InvalidRequest("tool_choice", f"names the function {name!r}, which is not "
                             f"in tools (given: {', '.join(names)})")
    return ToolChoice(tools, mode, name, req.parallel_tool_calls is not False)


def _tool_entry(tool: p.ToolDef, index: int) -> dict[str, Any]:
    """One tool as an OpenAI entry; its schema must compile for decoding."""
    function = tool.function.model_dump(exclude_none=True)
    schema = function.setdefault("parameters", NO_PARAMETERS)
    where = f"tools[{index}].function.parameters"
    if schema.get("type", "object") != "object":
        raise InvalidRequest(where, "must be a JSON schema of type object (the arguments)")
    constrain.check(constrain.json_schema(schema, field=where))
    return {"type": "function", "function": function}


def forced_constraint(syntax: ToolSyntax, tools: list[dict[str, Any]]) -> Constraint:
    """A grammar for exactly one call, in ``syntax``'s markers, to one of
    ``tools``, its arguments under that tool's parameter schema."""
    before, between, after = syntax.forced_call
    rules = [f"call_{i}" for i in range(len(tools))]
    lines = [f"start: {_literal(before)} ({' | '.join(rules)}) {_literal(after)}"]
    for rule, tool in zip(rules, tools, strict=True):
        function = tool["function"]
        schema = {**function["parameters"], "x-guidance": _LAYOUT}
        lines.append(f"{rule}: {_literal(json.dumps(function['name']) + between)} {rule}_args")
        lines.append(f"{rule}_args: %json {json.dumps(schema)}")
    constraint = Constraint("lark", "\n".join(lines), "tool_choice")
    constrain.check(constraint)
    return constraint


def _literal(text: str) -> str:
    # A Lark string literal escapes like JSON (the texts here are ASCII).
    return json.dumps(text)


def tools_request(model: Model, messages: list[dict[str, Any]], choice: ToolChoice,
                 options: dict[str, Any]) -> Request:
    """The Request for a chat with tools: offered in the model's syntax, the
    history's calls and results rendered in it, a forced call constrained."""
    syntax = syntax_for(model.chat_format)
    if choice.forced:
        if "constraint" in options:
            raise InvalidRequest("tool_choice", "a forced tool call cannot be combined "
                                 "with response_format")
        options = {**options, "constraint": forced_constraint(syntax, choice.forced)}
    return tool_request(model, syntax, messages, choice.offered, strict_context=True,
                        **options)


def split_answer(syntax: ToolSyntax, text: str, parallel: bool,
                 ) -> tuple[str | None, list[p.ResponseToolCall] | None]:
    """A whole answer as ``message.content`` (None if only calls) and
    ``message.tool_calls`` (None if there are none)."""
    content, calls = syntax.parse(text)
    calls = calls if parallel else calls[:1]
    return content or None, [_response_call(c) for c in calls] or None


def _response_call(call: ToolCall) -> p.ResponseToolCall:
    return p.ResponseToolCall(id=call.id, function=p.ResponseFunction(
        name=call.name, arguments=call.arguments))


class ChoiceStreams:
    """One stream parser per choice: streamed text in, OpenAI ``delta`` objects
    out (``{"content": ...}`` or ``{"tool_calls": [...]}``)."""

    def __init__(self, syntax: ToolSyntax, parallel: bool) -> None:
        self._syntax = syntax
        self._parallel = parallel
        self._parsers: dict[int, StreamParser] = {}
        self._called: set[int] = set()

    def feed(self, index: int, text: str) -> list[dict[str, Any]]:
        return self._deltas(index, self._parser(index).feed(text))

    def finish(self, index: int) -> list[dict[str, Any]]:
        """The end of choice ``index``: what its parser still held."""
        return self._deltas(index, self._parser(index).finish())

    def called(self, index: int) -> bool:
        """Whether choice ``index`` has made a tool call."""
        return index in self._called

    def _parser(self, index: int) -> StreamParser:
        if index not in self._parsers:
            self._parsers[index] = self._syntax.stream()
        return self._parsers[index]

    def _deltas(self, index: int, items: list[ContentDelta | ToolCallDelta],
                ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for item in items:
            if isinstance(item, ContentDelta):
                out.append({"content": item.text})
            elif self._parallel or item.index == 0:
                self._called.add(index)
                out.append({"tool_calls": [item.to_openai()]})
        return out

"""Tool-call syntaxes: which one a model speaks, and how to render and parse it.

The syntax is looked up by data: the first module in ``SYNTAXES`` whose
``detect`` finds its markers in the ChatFormat's template; a template that
knows no tools gets Lanner's default syntax (``lanner_default``), where the
tools are described in the system prompt.

    syntax = syntax_for(model.chat_format)
    prompt = syntax.render(model.chat_format, messages, tools)   # text to tokenize
    content, calls = syntax.parse(answer_text)                    # whole text
    parser = syntax.stream()                                      # streaming
    for event in backend_events:                                  # see split_stream
        for delta in parser.feed(event.text): ...
    for delta in parser.finish(): ...

Every delta is a ``ContentDelta`` (text for the user) or a ``ToolCallDelta``
(a complete call with its index; ``to_openai()`` gives the chunk entry).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from lanner.chat.toolcalls import hermes, lanner_default, llama3, mistral
from lanner.chat.toolcalls.base import (
    ContentDelta,
    Delta,
    StreamParser,
    ToolCall,
    ToolCallDelta,
    new_call_id,
)
from lanner.engine.chatformat import ChatFormat, validate_messages
from lanner.engine.types import Event, Finish, TextDelta
from lanner.errors import InvalidRequest

SYNTAXES: tuple[ModuleType, ...] = (hermes, mistral, llama3)
"""Template-native syntaxes, tried in order."""
DEFAULT = lanner_default

__all__ = ["ContentDelta", "Delta", "StreamParser", "ToolCall", "ToolCallDelta", "ToolSyntax",
           "new_call_id", "split_stream", "syntax_for", "syntax_named"]


@dataclass(frozen=True)
class ToolSyntax:
    """One syntax module, with the operations the tool loop and the server need."""

    module: ModuleType

    @property
    def name(self) -> str:
        return str(self.module.NAME)

    @property
    def native(self) -> bool:
        """True if the model's own template renders the tool descriptions."""
        return bool(self.module.NATIVE)

    @property
    def forced_call(self) -> tuple[str, str, str]:
        """One call as (text before the JSON-encoded name, text between it and the
        arguments object, text after it); the output shape of a forced call."""
        before, between, after = self.module.FORCED_CALL
        return str(before), str(between), str(after)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) from a whole answer."""
        result: tuple[str, list[ToolCall]] = self.module.parse(text)
        return result

    def stream(self) -> StreamParser:
        """A fresh streaming parser for one answer."""
        parser: StreamParser = self.module.StreamParser()
        return parser

    def render(self, fmt: ChatFormat, messages: list[dict[str, Any]],
               tools: list[dict[str, Any]] | None, *, add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` with ``tools`` (OpenAI ``tools`` entries)
        offered; no tools renders the conversation (tool history included) without
        offering any. Raises InvalidRequest/ChatFormatError like ChatFormat.render."""
        clean = validate_messages(messages)
        if self.native:
            return fmt.render(native_messages(clean), tools=tools or None,
                              add_generation_prompt=add_generation_prompt)
        prepared = lanner_default.prompt_messages(clean, tools or [])
        return fmt.render(prepared, add_generation_prompt=add_generation_prompt)


def syntax_for(fmt: ChatFormat) -> ToolSyntax:
    """The syntax a chat format's template speaks, else Lanner's default."""
    module = next((m for m in SYNTAXES if m.detect(fmt.template)), DEFAULT)
    return ToolSyntax(module)


def syntax_named(name: str) -> ToolSyntax:
    """A syntax by ``NAME`` ("hermes", "mistral", "llama3", "lanner")."""
    for module in (*SYNTAXES, DEFAULT):
        if name == module.NAME:
            return ToolSyntax(module)
    known = ", ".join(m.NAME for m in (*SYNTAXES, DEFAULT))
    raise InvalidRequest("tool_syntax", f"unknown tool-call syntax {name!r} (known: {known})")


def split_stream(
    events: Iterable[Event], parser: StreamParser
) -> Iterator[ContentDelta | ToolCallDelta | Finish]:
    """An engine event stream as content deltas, tool-call deltas and the Finish.

    Held-back text comes out before the Finish. Closing this generator closes
    nothing upstream: the caller owns ``events``.
    """
    for event in events:
        if isinstance(event, TextDelta):
            yield from parser.feed(event.text)
        else:
            yield from parser.finish()
            yield event


def native_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as HF templates expect them: a tool call's ``arguments`` as an
    object, not JSON text (templates apply ``tojson`` themselves)."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_native_call(c) for c in calls]}
        out.append(message)
    return out


def _native_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        # Unparseable arguments stay text: the template shows what the model wrote.
        with contextlib.suppress(json.JSONDecodeError):
            function["arguments"] = json.loads(arguments) if arguments.strip() else {}
    return {**call, "type": call.get("type", "function"), "function": function}

"""Lanner's default tool-call syntax, for models whose template knows no tools.

The tools are described in the system prompt (``prompts/tools_default_system
.jinja``) and the model answers with Hermes-style blocks, the syntax most
small open models were trained on (SmolLM2's function-calling data included):

    <tool_call>
    {"name": "sums", "arguments": {"a": 2, "b": 3}}
    </tool_call>

A block may also hold a JSON list of such objects (SmolLM2's own habit).
Results go back as a user message of ``<tool_response name="...">`` blocks
(``prompts/tools_default_result.jinja``), because such templates know only the
system, user and assistant roles. Earlier tool calls are written back into the
assistant's text in the same syntax, so the model sees what it did.
"""

from __future__ import annotations

import json
from typing import Any

from lanner.chat.prompts import render_prompt
from lanner.chat.toolcalls import hermes
from lanner.chat.toolcalls.base import StreamParser as _Base
from lanner.chat.toolcalls.base import ToolCall, parse_with

NAME = "lanner"
NATIVE = False
START, END = hermes.START, hermes.END
FORCED_CALL = hermes.FORCED_CALL


def detect(template: str) -> bool:
    """The default works with any template (it needs only a system message)."""
    return True


class StreamParser(_Base):
    markers = (START,)

    def take(self, buf: str, final: bool) -> tuple[list[ToolCall], int] | None:
        return hermes.take_block(buf, final)


def parse(text: str) -> tuple[str, list[ToolCall]]:
    return parse_with(StreamParser(), text)


def format_call(name: str, arguments: str) -> str:
    """One call written in this syntax (``arguments`` is JSON text)."""
    return f'{START}\n{{"name": {json.dumps(name)}, "arguments": {arguments or "{}"}}}\n{END}'


def prompt_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The conversation rewritten for a template that knows no tools: the tool
    descriptions joined to the system message (none when ``tools`` is empty),
    calls written into the assistant's text, each run of tool results made one
    user message."""
    system = next((m["content"] for m in messages[:1] if m["role"] == "system"), None)
    out: list[dict[str, Any]] = []
    # OpenAI clients send a result with its call's id, not the tool's name.
    names = {c.get("id"): c["function"]["name"] for m in messages
             for c in m.get("tool_calls") or []}
    if tools:
        specs = [json.dumps(t.get("function", t), ensure_ascii=False) for t in tools]
        out.append({"role": "system", "content": render_prompt(
            "tools_default_system.jinja", system=system, tools=specs).strip()})
    elif system is not None:
        out.append(messages[0])
    for message in messages[1:] if system is not None else messages:
        if message["role"] == "tool":
            name = message.get("name") or names.get(message.get("tool_call_id"), "")
            text = render_prompt("tools_default_result.jinja", name=name,
                                 content=message.get("content") or "").strip()
            if out and out[-1].get("_results"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + text}
            else:
                out.append({"role": "user", "content": text, "_results": True})
        elif message["role"] == "assistant" and message.get("tool_calls"):
            calls = [format_call(c["function"]["name"], _arguments_text(c))
                     for c in message["tool_calls"]]
            said = [message["content"]] if message.get("content") else []
            out.append({"role": "assistant", "content": "\n".join(said + calls)})
        else:
            out.append(message)
    return [{k: v for k, v in m.items() if k != "_results"} for m in out]


def _arguments_text(call: dict[str, Any]) -> str:
    arguments = call["function"].get("arguments")
    return arguments if isinstance(arguments, str) else json.dumps(arguments or {})

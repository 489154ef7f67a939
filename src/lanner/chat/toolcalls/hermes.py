"""Hermes / Qwen tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Used by Qwen2/2.5/3, Hermes 2/3 and many fine-tunes; the model's own template
renders the tools (``NATIVE``). One block per call, any number of blocks, text
allowed before, between and after them. A block the model did not close
before the end of its answer is still parsed. Qwen3-Coder's XML body
(``<function=name><parameter=x>value</parameter></function>``) is read too;
a parameter value is JSON if it parses as JSON, else text.

Small models sometimes drop the tags and answer with the bare object
(Qwen2.5-Coder-0.5B does, asked "What is 12 factorial?" with a python tool).
A bare object is a call only where llama3's bare calls may stand (the start
of the answer, or right after another call) and only with both ``name`` and
``arguments`` keys; any other JSON stays content.
"""

from __future__ import annotations

import json
import re

from lanner.chat.toolcalls.base import StreamParser as _Base
from lanner.chat.toolcalls.base import ToolCall, calls_from_json, json_end, parse_with

NAME = "hermes"
NATIVE = True
START = "<tool_call>"
END = "</tool_call>"
FORCED_CALL = (f'{START}\n{{"name": ', ', "arguments": ', f"}}\n{END}")
"""One call as (text before the name, between name and arguments, after them):
the shape a forced tool call is constrained to."""
_FUNCTION = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|\Z)", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?(?:</parameter>|(?=<parameter=)|\Z)",
                        re.S)


def detect(template: str) -> bool:
    """The template writes tool calls in ``<tool_call>`` blocks."""
    return START in template


def take_block(buf: str, final: bool) -> tuple[list[ToolCall], int] | None:
    """One ``<tool_call>...</tool_call>`` block at the start of ``buf`` (a JSON
    object, or a list of them) as calls; see ``StreamParser.take``."""
    end = buf.find(END, len(START))
    if end < 0:
        if not final:
            return None
        body, used = buf[len(START):], len(buf)
    else:
        body, used = buf[len(START):end], end + len(END)
    return calls_from_json(body.strip()) or xml_calls(body), used


def xml_calls(body: str) -> list[ToolCall]:
    """Calls written in Qwen3-Coder's XML form; [] if there are none."""
    calls = []
    for name, params in _FUNCTION.findall(body):
        arguments = {key: _value(value) for key, value in _PARAMETER.findall(params)}
        calls.append(ToolCall.make(name, arguments))
    return calls


def _value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def take_bare(buf: str, final: bool) -> tuple[list[ToolCall], int] | None:
    """A tag-less ``{"name": ..., "arguments": {...}}`` object at the start of
    ``buf`` (after whitespace) as a call; see ``StreamParser.take``."""
    at = len(buf) - len(buf.lstrip())
    end = json_end(buf, at)
    if end is None:
        return None if not final else ([], len(buf))
    body = buf[at:end]
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return [], end
    if not (isinstance(value, dict) and "name" in value and "arguments" in value):
        return [], end
    return calls_from_json(body), end


class StreamParser(_Base):
    markers = (START,)

    def find_start(self, buf: str, final: bool) -> tuple[int, int]:
        if self.at_boundary:
            stripped = buf.lstrip()
            if not stripped:  # only whitespace so far: it may precede a call
                return -1, len(buf) if final else 0
            if stripped[0] == "{":
                return 0, 0
        return super().find_start(buf, final)

    def take(self, buf: str, final: bool) -> tuple[list[ToolCall], int] | None:
        if buf.lstrip().startswith("{"):
            return take_bare(buf, final)
        return take_block(buf, final)


def parse(text: str) -> tuple[str, list[ToolCall]]:
    """(content without the call blocks, the calls in order)."""
    return parse_with(StreamParser(), text)

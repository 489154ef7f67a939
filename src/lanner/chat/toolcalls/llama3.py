"""Llama 3.1-3.3 tool calls: a JSON object ``{"name": ..., "parameters": {...}}``.

The model writes the object as its whole answer (the template asks for exactly
that), optionally after ``<|python_tag|>``; several calls are separated by
``;`` or whitespace. A bare object counts as a call only at the start of the
answer or right after another call, and only if it has a ``name`` and
``parameters`` (or ``arguments``): other JSON stays content. After
``<|python_tag|>`` text before the tag is content.
"""

from __future__ import annotations

import re

from lanner.chat.toolcalls.base import StreamParser as _Base
from lanner.chat.toolcalls.base import ToolCall, calls_from_json, json_end, parse_with

NAME = "llama3"
NATIVE = True
PYTHON_TAG = "<|python_tag|>"
FORCED_CALL = ('{"name": ', ', "parameters": ', "}")
# Llama 3.1/3.2/3.3 templates tell the model the exact call format in these words.
_TEMPLATE_HINTS = (PYTHON_TAG, '{"name": function name, "parameters": dictionary')
_KEYS = ("parameters", "arguments")
_SEPARATOR = re.compile(r"\s*;")
_GAP = " \t\r\n;"  # what may separate two calls


def detect(template: str) -> bool:
    return any(hint in template for hint in _TEMPLATE_HINTS)


class StreamParser(_Base):
    markers = (PYTHON_TAG,)

    def find_start(self, buf: str, final: bool) -> tuple[int, int]:
        if self.at_boundary:
            stripped = buf.lstrip(_GAP)
            if not stripped:  # only whitespace so far: it may precede a call
                return -1, len(buf) if final else 0
            if stripped[0] == "{":
                return 0, 0
        return super().find_start(buf, final)

    def take(self, buf: str, final: bool) -> tuple[list[ToolCall], int] | None:
        at = len(PYTHON_TAG) if buf.startswith(PYTHON_TAG) else 0
        at += len(buf[at:]) - len(buf[at:].lstrip(_GAP))
        if at >= len(buf):
            return None if not final else ([], len(buf))
        if buf[at] != "{":
            return [], at or 1
        end = json_end(buf, at)
        if end is None:
            return None if not final else ([], len(buf))
        calls = calls_from_json(buf[at:end], _KEYS)
        if not calls:
            return [], end
        sep = _SEPARATOR.match(buf, end)
        return calls, sep.end() if sep else end


def parse(text: str) -> tuple[str, list[ToolCall]]:
    return parse_with(StreamParser(), text)

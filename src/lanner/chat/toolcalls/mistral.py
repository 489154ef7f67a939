"""Mistral tool calls: ``[TOOL_CALLS]`` then the calls.

Two shapes, both handled: the JSON list of Mistral-7B-v0.3, Nemo and Small 3
(``[TOOL_CALLS] [{"name": ..., "arguments": {...}, "id": ...}, ...]``) and the
per-call form of newer models (``[TOOL_CALLS]name[ARGS]{...}``, optionally
``name[CALL_ID]id[ARGS]{...}``), one marker per call. Text before the marker is
content. Tool-call ids are 9 letters or digits, as Mistral's templates demand.
"""

from __future__ import annotations

import re

from lanner.chat.toolcalls.base import StreamParser as _Base
from lanner.chat.toolcalls.base import ToolCall, calls_from_json, json_end, parse_with

NAME = "mistral"
NATIVE = True
START = "[TOOL_CALLS]"
FORCED_CALL = (f'{START}[{{"name": ', ', "arguments": ', "}]")
_NAMED = re.compile(r"\s*([A-Za-z0-9_.-]+)(?:\[CALL_ID\]([A-Za-z0-9]+))?\[ARGS\]\s*")
_MAX_NAME = 200  # past this without [ARGS], it is not a per-call header


def detect(template: str) -> bool:
    return START in template


class StreamParser(_Base):
    markers = (START,)

    def take(self, buf: str, final: bool) -> tuple[list[ToolCall], int] | None:
        rest = buf[len(START):]
        skip = len(rest) - len(rest.lstrip())
        if not rest.strip():
            return None if not final else ([], len(buf))
        if rest[skip] == "[":
            return self._json_list(buf, len(START) + skip, final)
        return self._named(buf, final)

    def _json_list(self, buf: str, at: int, final: bool) -> tuple[list[ToolCall], int] | None:
        end = json_end(buf, at)
        if end is None:
            return None if not final else ([], len(buf))
        return calls_from_json(buf[at:end]), end

    def _named(self, buf: str, final: bool) -> tuple[list[ToolCall], int] | None:
        m = _NAMED.match(buf, len(START))
        if m is None:
            waiting = not final and len(buf) < len(START) + _MAX_NAME and "{" not in buf
            return None if waiting else ([], len(buf) if final else len(START))
        if m.end() >= len(buf) or buf[m.end()] != "{":
            return None if not final and m.end() >= len(buf) else ([], m.end())
        end = json_end(buf, m.end())
        if end is None:
            return None if not final else ([], len(buf))
        calls = calls_from_json(f'{{"name": "{m.group(1)}", "arguments": {buf[m.end():end]}}}')
        if calls and m.group(2):
            calls = [ToolCall(calls[0].name, calls[0].arguments, m.group(2))]
        return calls, end


def parse(text: str) -> tuple[str, list[ToolCall]]:
    return parse_with(StreamParser(), text)

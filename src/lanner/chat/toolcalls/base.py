"""What every tool-call syntax shares: the ToolCall type, the deltas a stream
parser yields, and the marker-driven state machine the syntaxes configure.

A syntax module (hermes, llama3, mistral, lanner_default) exports the same
names: ``NAME``, ``NATIVE`` (whether the model's own template renders the
tools), ``detect(template) -> bool``, ``parse(text) -> (content, calls)`` and
``StreamParser`` (``feed(text) -> list[Delta]``, ``finish() -> list[Delta]``)
and ``FORCED_CALL`` (the text around a call's name and arguments, used to
constrain a forced call).
Whole-text parsing is "feed everything, then finish", so streaming and
non-streaming extraction always agree.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """A tool-call id: 9 letters and digits (Mistral's templates require exactly
    that shape, and every other client accepts it)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


@dataclass(frozen=True)
class ToolCall:
    """One function call the model asked for; ``arguments`` is JSON text."""

    name: str
    arguments: str
    id: str

    @classmethod
    def make(cls, name: str, arguments: object, call_id: str | None = None) -> ToolCall:
        """A call from parsed JSON; a non-string ``arguments`` is encoded as JSON."""
        text = arguments if isinstance(arguments, str) else json.dumps(
            arguments if arguments is not None else {}, ensure_ascii=False)
        return cls(name, text, call_id or new_call_id())

    def arguments_dict(self) -> dict[str, Any]:
        """The arguments decoded; {} if they are not a JSON object."""
        try:
            value = json.loads(self.arguments)
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}

    def to_openai(self) -> dict[str, Any]:
        """The call as in an OpenAI assistant message's ``tool_calls`` list."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ContentDelta:
    """Plain text for the user (never part of a call marker)."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A complete tool call, the ``index``-th of this answer (from 0)."""

    index: int
    call: ToolCall

    def to_openai(self) -> dict[str, Any]:
        """The ``delta.tool_calls[i]`` entry of an OpenAI streaming chunk."""
        return {"index": self.index, **self.call.to_openai()}


Delta = ContentDelta | ToolCallDelta


class StreamParser:
    """Splits streamed model text into content and tool calls.

    ``feed`` never returns text that might be the beginning of a call marker:
    it is held back until the next delta shows what it is. A block that starts
    like a call but cannot be parsed comes out as content, so nothing the model
    said is lost. Subclasses set ``markers`` and implement ``take``.
    """

    markers: tuple[str, ...] = ()
    """Texts that open a tool call."""

    def __init__(self) -> None:
        self._buf = ""
        self._in_call = False
        self._index = 0
        self.at_boundary = True
        """True at the start of the answer and right after a call (only
        whitespace since): where a bare-JSON call may begin."""

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[Delta]:
        """The end of the answer: everything still held comes out."""
        return self._drain(final=True)

    # -- hooks for syntaxes ---------------------------------------------------

    def find_start(self, buf: str, final: bool) -> tuple[int, int]:
        """(index where a call starts or -1, how much of ``buf`` is surely content)."""
        found = [i for i in (buf.find(m) for m in self.markers) if i >= 0]
        if found:
            start = min(found)
            return start, start
        return -1, len(buf) - (0 if final else held_prefix(buf, self.markers))

    def take(self, buf: str, final: bool) -> tuple[list[ToolCall], int] | None:
        """``buf`` starts where a call starts. Return (calls, characters used);
        no calls means "not a call after all: those characters are content";
        None means "need more text" (never returned when ``final``)."""
        raise NotImplementedError

    # -- the state machine ---------------------------------------------------------

    def _drain(self, final: bool) -> list[Delta]:
        out: list[Delta] = []
        while self._buf:
            if not self._in_call:
                start, safe = self.find_start(self._buf, final)
                if start < 0:
                    self._content(out, safe)
                    break
                self._content(out, start)
                self._in_call = True
            taken = self.take(self._buf, final)
            if taken is None:
                if final:  # an unfinished call: show it rather than lose it
                    self._content(out, len(self._buf))
                break
            calls, used = taken
            self._in_call = False
            if not calls:
                self._content(out, max(used, 1))
                continue
            for call in calls:
                out.append(ToolCallDelta(self._index, call))
                self._index += 1
            self._buf = self._buf[used:]
            self.at_boundary = True
        return _merge(out)

    def _content(self, out: list[Delta], n: int) -> None:
        text, self._buf = self._buf[:n], self._buf[n:]
        if text:
            out.append(ContentDelta(text))
            self.at_boundary = self.at_boundary and not text.strip()


def parse_with(parser: StreamParser, text: str) -> tuple[str, list[ToolCall]]:
    """Whole-text extraction through a stream parser: (content, calls);
    the content is stripped of surrounding whitespace."""
    deltas = [*parser.feed(text), *parser.finish()]
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    return content.strip(), [d.call for d in deltas if isinstance(d, ToolCallDelta)]


def held_prefix(buf: str, markers: Iterable[str]) -> int:
    """Length of the longest end of ``buf`` that is a proper start of a marker."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(buf)), best, -1):
            if buf.endswith(marker[:k]):
                best = k
                break
    return best


def json_end(text: str, start: int) -> int | None:
    """Index just past the JSON object or array that opens at ``text[start]``,
    or None if it is not closed yet (brackets counted outside strings)."""
    depth = 0
    in_string = escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def calls_from_json(body: str, argument_keys: tuple[str, ...] = ("arguments",)) -> list[ToolCall]:
    """Calls from JSON text: one object or a list of objects, each with a
    ``name`` and arguments under one of ``argument_keys``; [] if it is not that."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return []
    return calls_from_value(value, argument_keys)


def calls_from_value(value: object, argument_keys: tuple[str, ...]) -> list[ToolCall]:
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("function"), dict):
            item = {**item["function"], "id": item.get("id")}  # OpenAI's own shape
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return []
        key = next((k for k in argument_keys if k in item), None)
        arguments = item.get(key) if key else {}
        if not isinstance(arguments, dict | str):
            return []
        call_id = item.get("id") if isinstance(item.get("id"), str) else None
        calls.append(ToolCall.make(item["name"], arguments, call_id))
    return calls


def _merge(deltas: list[Delta]) -> list[Delta]:
    """Adjacent content deltas joined into one."""
    out: list[Delta] = []
    for d in deltas:
        if out and isinstance(d, ContentDelta) and isinstance(out[-1], ContentDelta):
            out[-1] = ContentDelta(out[-1].text + d.text)
        else:
            out.append(d)
    return out

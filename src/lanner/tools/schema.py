"""Python functions as tools: the OpenAI function schema from a signature, and
a call that never crashes the conversation.

    @tool
    def sums(a: int, b: int) -> int:
        '''Add two whole numbers.

        Args:
            a: the first number
            b: the second number
        '''
        return a + b

    describe(sums)   # {"type": "function", "function": {"name": "sums", ...}}
    call(sums, '{"a": 2, "b": 3}')   # "5"

Types come from the type hints (pydantic builds the JSON schema and validates
the arguments), descriptions from the docstring (Google ``Args:`` sections or
Sphinx ``:param x:`` lines). ``call`` turns every problem (bad JSON, invalid
arguments, an exception in the tool) into an error text for the model.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, overload

import pydantic

from lanner.errors import InvalidRequest

# Result texts longer than this are cut: a tool must not flood the context window.
MAX_RESULT_CHARS = 8000
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


class _ToolRaised(Exception):
    """Marks an exception raised by the tool itself (not by argument validation)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, description, parameter schema."""

    name: str
    description: str
    parameters: dict[str, Any]
    """JSON schema of the arguments object."""
    fn: Callable[..., Any] = field(repr=False)
    adapter: pydantic.TypeAdapter[Any] = field(repr=False, compare=False)

    def schema(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry for this function."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def call(self, arguments: str | dict[str, Any]) -> str:
        """Validate ``arguments`` (JSON text or a dict), run the tool, return text.

        Never raises for the model's mistakes or the tool's failures: the
        returned text starts with ``Error:`` and says what went wrong.
        """
        args = _parse_arguments(arguments)
        if isinstance(args, str):
            return args
        try:
            result = self.adapter.validate_python(args)
        except pydantic.ValidationError as exc:
            return f"Error: invalid arguments for {self.name}: {_validation_text(exc)}"
        except _ToolRaised as exc:
            err = exc.error
            return f"Error: {self.name} failed: {type(err).__name__}: {err}"
        return result_text(result)


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...
@overload
def tool(*, name: str | None = None,
         description: str | None = None) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
         description: str | None = None) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Decorator: ``@tool`` or ``@tool(name=..., description=...)`` makes a Tool.

    The result is still callable like the function. Raises InvalidRequest if
    the name is not a valid function name or a parameter has no usable type.
    """
    def build(f: Callable[..., Any]) -> Tool:
        return make_tool(f, name=name, description=description)

    return build if fn is None else build(fn)


def make_tool(fn: Callable[..., Any], *, name: str | None = None,
              description: str | None = None) -> Tool:
    """The Tool for a function (a Tool is returned as is)."""
    if isinstance(fn, Tool):
        return fn
    tool_name = str(name or getattr(fn, "__name__", ""))
    if not _NAME.match(tool_name):
        raise InvalidRequest("tool", f"{tool_name!r} is not a valid tool name "
                             "(letters, digits, _ or -, at most 64)")
    summary, params = parse_docstring(inspect.getdoc(fn) or "")
    try:
        adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(
            _guarded(fn))  # type: ignore[arg-type]  # pydantic accepts callables
        parameters = adapter.json_schema()
    except (pydantic.PydanticUserError, pydantic.errors.PydanticSchemaGenerationError,
            TypeError, NameError) as exc:
        raise InvalidRequest("tool", f"cannot build a schema for {tool_name}: {exc}") from exc
    parameters = _strip_titles(parameters)
    for pname, text in params.items():
        prop = parameters.get("properties", {}).get(pname)
        if isinstance(prop, dict) and "description" not in prop:
            prop["description"] = text
    return Tool(tool_name, description or summary, parameters, fn, adapter)


def describe(fn: Callable[..., Any]) -> dict[str, Any]:
    """The OpenAI function schema (``{"type": "function", "function": {...}}``)."""
    return make_tool(fn).schema()


def call(fn: Callable[..., Any], arguments: str | dict[str, Any]) -> str:
    """Run a tool with the model's arguments; always returns text (see Tool.call)."""
    return make_tool(fn).call(arguments)


def result_text(result: object, limit: int = MAX_RESULT_CHARS) -> str:
    """A tool's return value as the text the model reads: strings as is,
    everything else as JSON (or ``str`` when not JSON-able); cut at ``limit``."""
    if isinstance(result, str):
        text = result
    else:
        try:
            text = json.dumps(result, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = str(result)
    if len(text) > limit:
        text = text[:limit] + f"\n[... cut: {len(text) - limit} more characters]"
    return text


# -- docstrings ------------------------------------------------------------------

_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Raises|Yields|Examples?)\s*:\s*$")
_PARAM = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_SPHINX_PARAM = re.compile(r"^\s*:param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)$")
_ARGS = ("Args", "Arguments", "Parameters")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a Google or Sphinx docstring.

    The description is the text before the first section or ``:param`` line.
    In a Google ``Args:`` section, a line indented like the first parameter
    starts a parameter; a deeper one continues it.
    """
    summary: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    base = -1  # indentation of parameter lines in the current Args section
    for line in doc.splitlines():
        if m := _SECTION.match(line):
            section, current, base = m.group(1), None, -1
        elif m := _SPHINX_PARAM.match(line):
            section, current, base = ":param", m.group(1), 1 << 30
            params[current] = m.group(2).strip()
        elif line.lstrip().startswith(":"):  # :returns:, :raises: ...
            section, current = "other", None
        elif section is None:
            summary.append(line.strip())
        elif section in (*_ARGS, ":param") and line.strip():
            indent = len(line) - len(line.lstrip())
            base = indent if base < 0 else base
            m = _PARAM.match(line.strip())
            if m and indent <= base:
                current = m.group(1)
                params[current] = m.group(2).strip()
            elif current:
                params[current] = f"{params[current]} {line.strip()}".strip()
    text = "\n".join(summary).strip()
    return re.sub(r"\n{3,}", "\n\n", text), params


# -- helpers ---------------------------------------------------------------------


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its exceptions wrapped, so they are told apart from pydantic's
    own validation errors (keeps fn's signature and hints via ``wraps``)."""
    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        # A tool is arbitrary user code: whatever it raises goes back to the model.
        except Exception as exc:
            raise _ToolRaised(exc) from exc

    return guarded


def _parse_arguments(arguments: str | dict[str, Any]) -> dict[str, Any] | str:
    """The arguments as a dict, or an error text for the model."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            return f"Error: the arguments are not valid JSON ({exc})"
    if not isinstance(arguments, dict):
        return f"Error: the arguments must be a JSON object, got {type(arguments).__name__}"
    return arguments


def _validation_text(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _strip_titles(schema: Any) -> Any:
    """Drop pydantic's generated ``title`` keys (noise in a small model's prompt),
    keeping properties that happen to be named "title"."""
    if isinstance(schema, list):
        return [_strip_titles(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {k: _strip_titles(v) for k, v in value.items()}
        else:
            out[key] = _strip_titles(value)
    return out

"""Python functions as tools: schema from the signature, calls that never crash."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pydantic
import pytest

from lanner.errors import InvalidRequest
from lanner.tools import call, describe, tool
from lanner.tools.loading import load_tool
from lanner.tools.schema import MAX_RESULT_CHARS, parse_docstring


@tool
def sums(a: int, b: int) -> int:
    """Add two whole numbers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


class Point(pydantic.BaseModel):
    x: float
    y: float


def place(name: str, at: Point, unit: Literal["m", "km"] = "m",
          tags: list[str] | None = None) -> dict[str, object]:
    """Put a named marker on the map.

    :param name: what to call it
    :param at: where it goes
    :returns: the marker
    """
    return {"name": name, "x": at.x, "unit": unit, "tags": tags or []}


def test_sums_schema_is_the_openai_function_schema() -> None:
    assert describe(sums) == {"type": "function", "function": {
        "name": "sums",
        "description": "Add two whole numbers.",
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"a": {"type": "integer", "description": "the first number"},
                           "b": {"type": "integer", "description": "the second number"}},
            "required": ["a", "b"]}}}


def test_decorated_function_still_works_as_a_function() -> None:
    assert sums(2, 3) == 5


def test_nested_models_enums_defaults_and_sphinx_docstrings() -> None:
    fn = describe(place)["function"]
    props = fn["parameters"]["properties"]
    assert fn["description"] == "Put a named marker on the map."
    assert props["name"]["description"] == "what to call it"
    assert props["unit"] == {"default": "m", "enum": ["m", "km"], "type": "string"}
    assert fn["parameters"]["required"] == ["name", "at"]
    assert "$defs" in fn["parameters"] and "Point" in fn["parameters"]["$defs"]
    assert "title" not in json.dumps(fn["parameters"]["$defs"]["Point"]["properties"]["x"])
    result = json.loads(call(place, '{"name": "home", "at": {"x": 1, "y": 2}, "unit": "km"}'))
    assert result == {"name": "home", "x": 1.0, "unit": "km", "tags": []}


def test_call_validates_and_converts_arguments() -> None:
    assert call(sums, '{"a": 2, "b": 3}') == "5"
    assert call(sums, {"a": "4", "b": 1}) == "5"  # pydantic's lax mode, as in the schema


@pytest.mark.parametrize(("arguments", "words"), [
    ('{"a": 1', ["not valid JSON"]),
    ("[1, 2]", ["must be a JSON object"]),
    ('{"a": "x", "b": 1}', ["invalid arguments for sums", "a:", "integer"]),
    ('{"a": 1}', ["invalid arguments", "b:", "required"]),
    ('{"a": 1, "b": 2, "c": 3}', ["invalid arguments", "c:"]),
])
def test_bad_arguments_become_an_error_text(arguments: str, words: list[str]) -> None:
    text = call(sums, arguments)
    assert text.startswith("Error:")
    for word in words:
        assert word in text


def test_an_exception_in_the_tool_becomes_an_error_text() -> None:
    def divide(a: float, b: float) -> float:
        """Divide a by b."""
        return a / b

    assert call(divide, {"a": 1, "b": 0}) == \
        "Error: divide failed: ZeroDivisionError: float division by zero"


def test_results_are_text_json_or_cut() -> None:
    def many() -> list[int]:
        """Numbers."""
        return list(range(MAX_RESULT_CHARS))

    def nothing() -> None:
        """Nothing."""

    text = call(many, "{}")
    assert text.startswith("[0, 1, 2") and "more characters]" in text
    assert len(text) < MAX_RESULT_CHARS + 100
    assert call(nothing, "") == "null"


def test_named_tool_and_bad_names() -> None:
    @tool(name="add-two", description="Adds.")
    def f(a: int) -> int:
        return a + 2

    assert describe(f)["function"]["name"] == "add-two"
    assert describe(f)["function"]["description"] == "Adds."
    with pytest.raises(InvalidRequest, match="not a valid tool name"):
        tool(name="two words")(lambda: 1)


def test_google_docstring_with_types_and_continuation_lines() -> None:
    summary, params = parse_docstring(
        "Do it.\n\nMore.\n\nArgs:\n    a (int): first\n        and more\n    b: second\n"
        "Returns:\n    x: not a parameter\n")
    assert summary == "Do it.\n\nMore."
    assert params == {"a": "first and more", "b": "second"}


def test_load_tool_from_a_file_and_a_module(tmp_path: Path) -> None:
    path = tmp_path / "mytools.py"
    path.write_text("def double(x: int) -> int:\n    '''Twice x.'''\n    return 2 * x\n")
    loaded = load_tool(f"{path}:double")
    assert loaded.name == "double" and loaded.call('{"x": 21}') == "42"
    assert load_tool("json:dumps").name == "dumps"


@pytest.mark.parametrize(("spec", "words"), [
    ("nocolon", "not module:function"),
    ("no_such_module_xyz:f", "cannot import"),
    ("json:no_such_function", "has no 'no_such_function'"),
    ("/no/such/file.py:f", "no such file"),
])
def test_load_tool_errors_name_the_flag(spec: str, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words) as info:
        load_tool(spec)
    assert info.value.param == "--tool"

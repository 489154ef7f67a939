"""The code interpreter tool: confirmation before each run, results back to the
model, and the guides' example "What is 12 factorial?" end to end (plumbing on
the scripted fake backend)."""

from __future__ import annotations

import builtins
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lanner.backends.fake import FakeBackend
from lanner.cli import main, options, render
from lanner.engine.engine import Engine
from lanner.tools import run_tools
from lanner.tools.python_tool import CONFIRM_QUESTION, DECLINED, python_tool
from lanner.tools.sandbox import Limits, Sandbox

FACTORIAL_CALL = ('<tool_call>\n{"name": "python", "arguments": {"code": '
                  '"import math\\nmath.factorial(12)"}}\n</tool_call>')


@pytest.fixture(autouse=True)
def need_bwrap() -> None:
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is not installed; run `make install`")


def answer_from_result(prompt: str) -> str:
    """The scripted model: call the tool first, then repeat the value it got back."""
    found = re.search(r"value: (\d+)", prompt)
    if '<tool_response name="python">' not in prompt:
        return FACTORIAL_CALL
    return f"12 factorial is {found.group(1)}." if found else "The tool gave no value."


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(limits=Limits(wall_s=10)) as box:
        yield box


def test_declined_code_does_not_run(sandbox: Sandbox) -> None:
    asked: list[str] = []
    tool = python_tool(confirm=lambda code: asked.append(code) or False, sandbox=sandbox)
    assert tool.call({"code": "open('x', 'w').write('1')"}) == DECLINED
    assert asked == ["open('x', 'w').write('1')"]
    assert list(sandbox.workdir.iterdir()) == []


def test_confirmed_code_runs_and_reports(sandbox: Sandbox) -> None:
    tool = python_tool(confirm=lambda code: True, sandbox=sandbox)
    text = tool.call({"code": "print('hi')\nopen('x.txt', 'w').write('1')\n6 * 7"})
    assert text == "stdout:\nhi\nvalue: 42\nfiles created or changed: x.txt (1 bytes)"


def test_yes_skips_the_question(sandbox: Sandbox) -> None:
    def never(code: str) -> bool:
        raise AssertionError("asked although yes=True")

    assert python_tool(yes=True, confirm=never, sandbox=sandbox).call(
        {"code": "1 + 1"}) == "value: 2"


def test_schema_tells_the_model_what_the_tool_does(sandbox: Sandbox) -> None:
    fn = python_tool(yes=True, sandbox=sandbox).schema()["function"]
    assert fn["name"] == "python"
    assert fn["parameters"]["required"] == ["code"]
    assert "no network" in fn["description"]


def test_twelve_factorial_end_to_end(sandbox: Sandbox, lanner_home: Path) -> None:
    backend = FakeBackend(answer_from_result)
    model = Engine(lanner_home).attach("fake", backend)
    asked: list[str] = []
    tool = python_tool(confirm=lambda code: asked.append(code) or True, sandbox=sandbox)
    result = run_tools(model, "What is 12 factorial?", [tool])
    assert asked == ["import math\nmath.factorial(12)"]  # confirmed before it ran
    assert result.results == ["value: 479001600"]
    assert "479001600" in result.answer


def scripted_input(monkeypatch: pytest.MonkeyPatch, answers: list[str]) -> list[str]:
    """Replace input(): returns ``answers`` in turn, then end of file; records prompts."""
    prompts: list[str] = []
    feed = iter(answers)

    def fake_input(prompt: str = "") -> str:
        prompts.append(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    return prompts


@pytest.fixture
def fake_cli_model(monkeypatch: pytest.MonkeyPatch, lanner_home: Path) -> FakeBackend:
    backend = FakeBackend(answer_from_result)
    model = Engine(lanner_home).attach("fake", backend)
    monkeypatch.setattr(options, "load_model", lambda args, name, streams=None: model)
    monkeypatch.setattr(options, "start_loading",  # run and chat
                        lambda args, name, streams=None: lambda: model)
    return backend


def test_cli_run_asks_then_answers(fake_cli_model: FakeBackend, monkeypatch: pytest.MonkeyPatch,
                                   capfd: pytest.CaptureFixture[str]) -> None:
    prompts = scripted_input(monkeypatch, ["y"])
    assert main(["run", "fake", "What is 12 factorial?", "--tool", "python"]) == 0
    out, err = capfd.readouterr()
    assert prompts == [""]  # asked once, on stderr, after the code
    assert err.index("math.factorial(12)") < err.index(CONFIRM_QUESTION)
    assert "479001600" in out and CONFIRM_QUESTION not in out


def test_cli_run_declined(fake_cli_model: FakeBackend, monkeypatch: pytest.MonkeyPatch,
                          capfd: pytest.CaptureFixture[str]) -> None:
    scripted_input(monkeypatch, ["n"])
    assert main(["run", "fake", "What is 12 factorial?", "--tool", "python"]) == 0
    out, err = capfd.readouterr()
    assert "479001600" not in out and "declined" in err


def test_cli_run_yes_does_not_ask(fake_cli_model: FakeBackend, monkeypatch: pytest.MonkeyPatch,
                                  capfd: pytest.CaptureFixture[str]) -> None:
    prompts = scripted_input(monkeypatch, [])
    assert main(["run", "fake", "What is 12 factorial?", "--tool", "python", "--yes"]) == 0
    assert prompts == [] and "479001600" in capfd.readouterr().out


def test_cli_chat_with_the_python_tool(fake_cli_model: FakeBackend,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capfd: pytest.CaptureFixture[str]) -> None:
    prompts = scripted_input(monkeypatch, ["What is 12 factorial?", "y"])
    # chat prints through render.stream_text, whose default stream is bound at import
    monkeypatch.setattr(render.stream_text, "__defaults__", (sys.stdout,))
    assert main(["chat", "fake", "--tools", "python"]) == 0
    out, err = capfd.readouterr()
    assert prompts == [">>> ", "", ">>> "] and CONFIRM_QUESTION in err
    assert "12 factorial is 479001600." in out

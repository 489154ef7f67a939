"""The bounded tool loop on the scripted fake backend: calls, results fed back,
step limit, logging, the CLI flags and the chat session with tools."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lanner import paths
from lanner.backends.fake import FakeBackend
from lanner.chat.session import ChatSession
from lanner.cli import main, options, tooling
from lanner.engine.engine import Engine
from lanner.engine.model import Model
from lanner.engine.types import TextDelta
from lanner.store import Store
from lanner.tools import ToolLoop, run_tools, tool
from lanner.tools.loop import DEFAULT_MAX_STEPS, ToolCallEvent, ToolResultEvent
from lanner.tools.session import ToolSession

CALL_SUMS = '<tool_call>\n{"name": "sums", "arguments": {"a": 1234, "b": 4321}}\n</tool_call>'
TOOLS_FILE = '''
def sums(a: int, b: int) -> int:
    """Add two whole numbers."""
    return a + b
'''


@tool
def sums(a: int, b: int) -> int:
    """Add two whole numbers."""
    return a + b


def fake_model(replies: list[str], home: Path) -> tuple[Model, FakeBackend]:
    backend = FakeBackend(replies)
    return Engine(home).attach("fake", backend), backend


def prompt_of(backend: FakeBackend, i: int) -> str:
    return backend.detokenize(list(backend.requests[i].prompt))


def test_call_then_answer(lanner_home: Path) -> None:
    model, backend = fake_model([f"Let me add. {CALL_SUMS}", "It is 5555."], lanner_home)
    result = run_tools(model, "What is 1234 + 4321?", [sums], temperature=0)
    assert result.answer == "It is 5555."
    assert result.steps == 1 and result.stopped == "answer"
    assert result.results == ["5555"]
    assert [m["role"] for m in result.messages] == ["user", "assistant", "tool", "assistant"]
    assert result.messages[1]["content"] == "Let me add."
    assert result.messages[2]["tool_call_id"] == result.calls[0].id
    # the tools were described in the first prompt, the result fed back in the second
    assert '"name": "sums"' in prompt_of(backend, 0)
    assert '<tool_response name="sums">\n5555\n</tool_response>' in prompt_of(backend, 1)
    assert backend.requests[0].temperature == 0


def test_two_calls_in_one_turn_run_in_order(lanner_home: Path) -> None:
    seen: list[str] = []

    @tool
    def note(text: str) -> str:
        """Write a note."""
        seen.append(text)
        return f"noted {text}"

    two = ('<tool_call>{"name": "note", "arguments": {"text": "a"}}</tool_call>'
           '<tool_call>{"name": "note", "arguments": {"text": "b"}}</tool_call>')
    model, backend = fake_model([two, "Done."], lanner_home)
    result = run_tools(model, "Note a and b.", [note])
    assert seen == ["a", "b"] and result.results == ["noted a", "noted b"]
    assert prompt_of(backend, 1).count("<tool_response name=") == 2


def test_unknown_tools_and_bad_arguments_go_back_to_the_model(lanner_home: Path) -> None:
    bad = ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
           '<tool_call>{"name": "sums", "arguments": {"a": "x"}}</tool_call>')
    model, backend = fake_model([bad, "Sorry."], lanner_home)
    result = run_tools(model, "Add.", [sums])
    assert result.results[0] == "Error: there is no tool named 'nope' (available: sums)"
    assert result.results[1].startswith("Error: invalid arguments for sums")
    assert "there is no tool named" in prompt_of(backend, 1)
    assert result.answer == "Sorry."


def test_step_limit_then_an_answer_without_tools(lanner_home: Path) -> None:
    model, backend = fake_model([CALL_SUMS, CALL_SUMS, "Gave up: 5555."], lanner_home)
    result = run_tools(model, "Add forever.", [sums], max_steps=2)
    assert result.stopped == "max_steps" and result.steps == 2
    assert len(backend.requests) == 3
    assert "<tools>" in prompt_of(backend, 1)
    assert "<tools>" not in prompt_of(backend, 2)  # the last call offers no tools
    assert result.answer == "Gave up: 5555."


def test_a_repeated_call_is_not_run_again_and_the_model_answers_from_the_results(
        lanner_home: Path) -> None:
    runs: list[int] = []

    @tool
    def count(n: int) -> int:
        """Count to n."""
        runs.append(n)
        return n

    call = '<tool_call>{"name": "count", "arguments": {"n": 3}}</tool_call>'
    model, backend = fake_model([call, f"{call}\n", "I counted to 3."], lanner_home)
    result = run_tools(model, "Count to 3.", [count])
    assert runs == [3] and result.results == ["3", "3"]  # the repeat got the same result
    assert result.stopped == "repeated" and result.steps == 2
    final = prompt_of(backend, 2)
    assert "<tools>" not in final and "Results of the tools you called:" in final
    assert 'count({"n": 3}) returned:\n3' in final
    assert result.answer == "I counted to 3."
    assert result.messages[-1] == {"role": "assistant", "content": "I counted to 3."}


def test_the_answer_from_results_keeps_the_conversation_around_the_question() -> None:
    from lanner.tools.loop import _final_question

    history = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "Add 1 and 2."}]
    asked = _final_question(history, {("sums", '{"a": 1, "b": 2}'): "3"})
    assert asked[0] == history[0] and len(asked) == 2
    assert asked[1]["content"].startswith("Add 1 and 2.\n\nResults of the tools you called:")
    assert 'sums({"a": 1, "b": 2}) returned:\n3' in asked[1]["content"]
    # a conversation without a user message gets the results as one
    alone = _final_question(history[:1], {("sums", "{}"): "0"})
    assert alone[0] == history[0] and "sums({}) returned:\n0" in alone[1]["content"]


def test_after_the_tools_are_withdrawn_nothing_is_parsed_as_a_call(lanner_home: Path) -> None:
    model, _ = fake_model([CALL_SUMS, CALL_SUMS], lanner_home)
    result = run_tools(model, "Add.", [sums], max_steps=1)
    assert result.stopped == "max_steps" and result.steps == 1
    assert result.answer == CALL_SUMS  # shown as text, not silently dropped


def test_every_call_is_logged_under_the_answer(lanner_home: Path) -> None:
    model, _ = fake_model([CALL_SUMS, "It is 5555."], lanner_home)
    with Store(paths.db_path(lanner_home)) as store:
        result = run_tools(model, "What is 1234 + 4321?", [sums], store=store)
        turns = store.turns()
        answer = turns[0]
        assert answer.id == result.turn_id and answer.parent_id is None
        assert answer.response == "It is 5555." and answer.sampling["strategy"] == "tools"
        steps = [t for t in turns if t.parent_id == answer.id]
        assert [t.sampling["step"] for t in steps] == ["tool step 1", "tool step 2"]
        assert steps[0].response == CALL_SUMS
        assert answer.completion_tokens == sum(t.completion_tokens for t in steps)
        assert store.conversation_messages(answer.conversation_id) == [
            {"role": "user", "content": "What is 1234 + 4321?"},
            {"role": "assistant", "content": "It is 5555."}]


def test_streaming_yields_text_calls_and_results(lanner_home: Path) -> None:
    model, _ = fake_model([f"Adding. {CALL_SUMS}", "5555."], lanner_home)
    loop = ToolLoop(model, [sums])
    kinds = [type(e).__name__ for e in loop.stream("Add.") if not isinstance(e, TextDelta)]
    assert kinds == ["ToolCallEvent", "ToolResultEvent", "Finish"]
    assert loop.result is not None and loop.result.answer == "5555."


def test_a_stream_cut_short_is_still_logged(lanner_home: Path) -> None:
    model, _ = fake_model([CALL_SUMS, "It is 5555."], lanner_home)
    with Store(paths.db_path(lanner_home)) as store:
        events = ToolLoop(model, [sums], store=store).stream("Add.")
        for event in events:
            if isinstance(event, ToolResultEvent):
                break
        events.close()
        turns = store.turns()
        assert len(turns) == 2 and turns[1].parent_id == turns[0].id


def test_native_template_gets_the_tools(lanner_home: Path) -> None:
    from test_toolcalls import QWEN_LIKE

    backend = FakeBackend([CALL_SUMS, "5555"], chat_template=QWEN_LIKE)
    model = Engine(lanner_home).attach("qwenish", backend)
    result = run_tools(model, "Add.", [sums])
    assert result.answer == "5555"
    first = backend.detokenize(list(backend.requests[0].prompt))
    assert "# Tools\n<tools>" in first and "You can call tools" not in first
    second = backend.detokenize(list(backend.requests[1].prompt))
    assert '{"name": "sums", "arguments": {"a": 1234, "b": 4321}}' in second
    assert "<|im_start|>tool\n5555<|im_end|>" in second


def test_bad_loop_settings() -> None:
    model = Engine().attach("fake", FakeBackend())
    with pytest.raises(Exception, match="max_steps"):
        ToolLoop(model, [sums], max_steps=0)
    with pytest.raises(Exception, match="at least one tool"):
        ToolLoop(model, [])
    assert tooling.DEFAULT_MAX_STEPS == DEFAULT_MAX_STEPS


# -- the CLI and the chat session -------------------------------------------------


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch, lanner_home: Path) -> FakeBackend:
    backend = FakeBackend([f"Let me add. {CALL_SUMS}", "It is 5555."])
    model = Engine(lanner_home).attach("fake", backend)
    monkeypatch.setattr(options, "load_model", lambda args, name, streams=None: model)
    monkeypatch.setattr(options, "start_loading",  # run and chat
                        lambda args, name, streams=None: lambda: model)
    return backend


def test_cli_run_with_a_tool_file(scripted: FakeBackend, tmp_path: Path,
                                  capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mytools.py"
    path.write_text(TOOLS_FILE)
    assert main(["run", "fake", "What is 1234 + 4321?", "--tool", f"{path}:sums"]) == 0
    out, err = capfd.readouterr()
    assert out == "Let me add. It is 5555.\n"
    assert '[tool call] sums({"a": 1234, "b": 4321})' in err
    assert "[tool result] 5555" in err


def test_cli_run_with_a_tool_json(scripted: FakeBackend, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mytools.py"
    path.write_text(TOOLS_FILE)
    assert main(["run", "fake", "Add.", "--tool", f"{path}:sums", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["text"] == "It is 5555." and data["steps"] == 1
    assert data["tool_calls"][0]["function"]["name"] == "sums"
    assert data["tool_calls"][0]["result"] == "5555"


def test_cli_errors_name_the_flag(scripted: FakeBackend,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "fake", "Add.", "--tool", "nocolon"]) == 2
    assert "--tool" in capsys.readouterr().err
    assert main(["run", "fake", "Add.", "--tool", "json:dumps", "--raw"]) == 2
    assert main(["run", "fake", "Add.", "--tool", "json:dumps", "--max-steps", "0"]) == 2


def test_tool_session_keeps_calls_in_the_history(lanner_home: Path) -> None:
    model, backend = fake_model([CALL_SUMS, "5555.", "Yes, 5555."], lanner_home)
    shown: list[object] = []
    with Store(paths.db_path(lanner_home)) as store:
        session = ToolSession.with_tools(ChatSession(model, store), [sums],
                                         on_event=shown.append)
        first = "".join(e.text for e in session.send("Add.") if isinstance(e, TextDelta))
        second = "".join(e.text for e in session.send("Sure?") if isinstance(e, TextDelta))
        assert (first, second) == ("5555.", "Yes, 5555.")
        assert [type(e) for e in shown] == [ToolCallEvent, ToolResultEvent]
        assert [m["role"] for m in session.messages] == \
            ["user", "assistant", "tool", "assistant", "user", "assistant"]
        assert "<tool_response" in prompt_of(backend, 2)  # the third call saw the result
        answers = [t for t in store.turns() if t.parent_id is None]
        assert len(answers) == 2
        assert {t.conversation_id for t in answers} == {session.conversation_id}

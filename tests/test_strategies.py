"""Inference strategies on the scripted fake backend: show-work, self-consistency,
check-revise, their logging and the --strategy flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lanner import paths
from lanner.backends.fake import FakeBackend
from lanner.chat.strategies import (
    extract_answer,
    looks_like_reasoning,
    normalize_answer,
    run_strategy,
)
from lanner.cli import main, options
from lanner.engine.engine import Engine
from lanner.engine.model import Model
from lanner.errors import InvalidRequest
from lanner.store import Store

CLIPS = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
         "clips in May. How many clips did Natalia sell altogether in April and May?")
WORKED_PROMPT = (f"{CLIPS}\n\nSolve this step by step: write out each step of your reasoning, "
                 'then give the final answer on the last line, in the form "Answer: <final '
                 'answer>".')


def fake(replies: list[str], home: Path) -> tuple[Model, FakeBackend]:
    backend = FakeBackend(replies)
    return Engine(home).attach("fake", backend), backend


def last_user(backend: FakeBackend, i: int) -> str:
    prompt = backend.detokenize(list(backend.requests[i].prompt))
    return prompt.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]


def test_show_work_asks_for_steps_and_extracts_the_answer(lanner_home: Path) -> None:
    model, backend = fake(["In May: 48 / 2 = 24.\nTotal: 48 + 24 = 72.\nAnswer: 72"],
                          lanner_home)
    result = run_strategy(model, CLIPS, "show-work")
    assert last_user(backend, 0) == WORKED_PROMPT
    assert result.answer == "72" and result.text.endswith("Answer: 72")
    assert len(result.calls) == 1


def test_show_work_leaves_other_questions_alone(lanner_home: Path) -> None:
    model, backend = fake(["Paris."], lanner_home)
    result = run_strategy(model, "What is the capital of France?", "show-work")
    assert last_user(backend, 0) == "What is the capital of France?"
    assert result.text == "Paris." and result.answer is None


def test_self_consistency_votes_on_normalised_answers(lanner_home: Path) -> None:
    model, backend = fake(["Answer: 72", "Answer: 70", "So the answer is $72.00.",
                           "Answer: 1", "#### 72"], lanner_home)
    result = run_strategy(model, CLIPS, "self-consistency", samples=5, seed=10)
    assert result.answer == "72" and result.text == "Answer: 72"
    assert result.votes == {"72": 3, "70": 1, "1": 1}
    assert [r.seed for r in backend.requests] == [10, 11, 12, 13, 14]
    assert all(last_user(backend, i) == WORKED_PROMPT for i in range(5))


def test_self_consistency_breaks_ties_by_the_earliest(lanner_home: Path) -> None:
    model, _ = fake(["Answer: 5", "Answer: 6", "Answer: 6", "Answer: 5"], lanner_home)
    assert run_strategy(model, CLIPS, "self-consistency", samples=4).answer == "5"


def test_self_consistency_needs_sampling(lanner_home: Path) -> None:
    model, _ = fake(["Answer: 1"], lanner_home)
    with pytest.raises(InvalidRequest, match="temperature"):
        run_strategy(model, CLIPS, "self-consistency", temperature=0)
    with pytest.raises(InvalidRequest, match="samples"):
        run_strategy(model, CLIPS, "self-consistency", samples=0)


def test_check_revise_drafts_critiques_and_revises(lanner_home: Path) -> None:
    model, backend = fake(["Draft: 70 clips.", "The draft added wrong: 48 + 24 = 72.",
                           "Natalia sold 72 clips."], lanner_home)
    result = run_strategy(model, CLIPS, "check-revise")
    assert result.text == "Natalia sold 72 clips."
    assert last_user(backend, 0) == CLIPS
    critique_prompt = last_user(backend, 1)
    assert "Draft answer:\nDraft: 70 clips." in critique_prompt and CLIPS in critique_prompt
    revise_prompt = last_user(backend, 2)
    assert "Review of the draft:\nThe draft added wrong: 48 + 24 = 72." in revise_prompt


def test_strategies_log_every_call_under_the_answer(lanner_home: Path) -> None:
    model, _ = fake(["d", "c", "final"], lanner_home)
    with Store(paths.db_path(lanner_home)) as store:
        result = run_strategy(model, CLIPS, "check-revise", store=store)
        answer, *calls = store.turns()
        assert answer.id == result.turn_id and answer.response == "final"
        assert answer.prompt == CLIPS and answer.sampling["strategy"] == "check-revise"
        assert [c.sampling["step"] for c in calls] == ["draft", "critique", "revision"]
        assert all(c.parent_id == answer.id for c in calls)
        assert store.conversation_messages(answer.conversation_id)[-1] == \
            {"role": "assistant", "content": "final"}


def test_unknown_strategy_and_bad_conversation(lanner_home: Path) -> None:
    model, _ = fake(["x"], lanner_home)
    with pytest.raises(InvalidRequest, match="unknown strategy"):
        run_strategy(model, "q", "tree-of-thought")
    with pytest.raises(InvalidRequest, match="last message"):
        run_strategy(model, [{"role": "system", "content": "s"}], "show-work")


@pytest.mark.parametrize(("question", "expected"), [
    (CLIPS, True),
    ("What is 17*23?", True),
    ("What is 12 factorial?", True),
    ("If all cats are mammals and Tom is a cat, then is Tom a mammal?", True),
    ("A train travels 60 km per hour for 3 hours. How far does it go?", True),
    ("What is the capital of France?", False),
    ("Write a poem about the sea.", False),
    ("Tell me about the 1990s.", False),
])
def test_looks_like_reasoning(question: str, expected: bool) -> None:
    assert looks_like_reasoning(question) is expected


@pytest.mark.parametrize(("text", "answer", "normalized"), [
    ("48 / 2 = 24\n48 + 24 = 72\nAnswer: 72 clips.", "72 clips", "72"),
    ("Answer: 5\nWait, let me redo it.\nFinal answer: 6", "6", "6"),
    ("so #### 1,234", "1,234", "1234"),
    ("The answer is $18.00.", "18.00", "18"),
    ("\\boxed{42}", "42", "42"),
    ("**Final answer: 3.50**", "3.50", "3.5"),
    ("I get 3 and then 7", "7", "7"),
    ("Answer: Paris", "Paris", "paris"),
])
def test_extract_and_normalize(text: str, answer: str, normalized: str) -> None:
    assert extract_answer(text) == answer
    assert normalize_answer(answer) == normalized


def test_no_answer_at_all() -> None:
    assert extract_answer("I do not know.") is None


def test_cli_strategy_flag(monkeypatch: pytest.MonkeyPatch, lanner_home: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = fake(["Answer: 72", "Answer: 72", "Answer: 9"], lanner_home)
    monkeypatch.setattr(options, "load_model", lambda args, name, streams=None: model)
    monkeypatch.setattr(options, "start_loading",  # run and chat
                        lambda args, name, streams=None: lambda: model)
    assert main(["run", "fake", CLIPS, "--strategy", "self-consistency", "--samples", "3",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["answer"] == "72" and data["votes"] == {"72": 2, "9": 1}
    assert data["calls"] == 3
    assert main(["run", "fake", CLIPS, "--strategy", "show-work"]) == 0
    out, err = capsys.readouterr()
    assert out == "Answer: 72\n" and "final answer: 72" in err  # the script starts over

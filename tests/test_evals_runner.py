"""The eval runner, its store and the CLI, on the scripted fake backend."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from lanner import paths
from lanner.backends.fake import FakeBackend
from lanner.cli import main
from lanner.engine.engine import Engine
from lanner.errors import NotSupported
from lanner.evals import runner
from lanner.evals.results import EvalStore
from lanner.evals.taskfile import load_task

DATA = Path(__file__).parent / "data" / "evals"


def _answers(prompt: str) -> str:
    """Right for sums, wrong for everything else."""
    question = prompt.rsplit("Question: ", 1)[1]
    numbers = [int(n) for n in re.findall(r"\d+", question)]
    return f" {sum(numbers)}\nQuestion: more" if "plus" in question else " 0"


def test_generate_until_scores_filtered_answers(lanner_home: Path) -> None:
    model = Engine(lanner_home).attach("fake", FakeBackend(_answers))
    task = load_task(DATA / "gen_tiny.yaml")
    done: list[int] = []
    result = runner.evaluate(model, task, progress=done.append)
    plus = [i for i in result.items if "plus" in i.prompt]
    assert len(plus) == 3 and all(i.scores["exact_match,number"] == 1.0 for i in plus)
    assert result.metrics["exact_match,number"].value == pytest.approx(3 / 12)
    assert plus[0].output["text"] == f" {plus[0].target}"  # cut at the stop string "\n"
    assert sum(done) == 12
    stop = model.backend.requests[0]
    assert stop.temperature == 0.0 and stop.max_tokens == 16 and "\n" in stop.stop


def test_a_model_without_loglikelihoods_gets_a_clear_error(lanner_home: Path) -> None:
    class ChatOnly(FakeBackend):
        loglikelihood = None  # type: ignore[assignment]

    model = Engine(lanner_home).attach("chat-only", ChatOnly())
    with pytest.raises(NotSupported, match="chat-only .* cannot score loglikelihoods"):
        runner.evaluate(model, load_task(DATA / "mc_tiny.yaml"), limit=2)


def test_runs_are_stored_and_diffed(lanner_home: Path, capsys: pytest.CaptureFixture) -> None:
    engine = Engine(lanner_home)
    task = load_task(DATA / "gen_tiny.yaml")
    good = runner.evaluate(engine.attach("good", FakeBackend(_answers)), task)
    bad = runner.evaluate(engine.attach("bad", FakeBackend([" 0"])), task)
    with EvalStore(paths.db_path(lanner_home)) as store:
        id_good, id_bad = store.save(good, ""), store.save(bad, "")
        record = store.get(id_good[:14])
        assert record.metrics["exact_match,number"]["value"] == pytest.approx(0.25)
        assert record.provenance["task_sha256"] == task.sha256()
        assert record.provenance["fewshot_seed"] == 1234
        assert len(store.items(id_good)) == 12
    assert main(["eval", "diff", id_good, id_bad]) == 0
    out = capsys.readouterr().out
    assert "3 of 12 items changed" in out and "#0: 1.0 -> 0.0" in out
    assert main(["eval", "--runs"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == [id_good[:12], id_bad[:12]]
    assert main(["eval", "show", id_bad, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model"] == "bad" and shown["metrics"]["exact_match,number"]["value"] == 0.0
    png = lanner_home / "chart.png"
    assert main(["eval", "plot", id_good, id_bad, "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_with_an_adapter_keeps_its_path_and_weights_hash(
        lanner_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    run = runner.evaluate(Engine(lanner_home).attach("fake", FakeBackend(_answers)),
                          load_task(DATA / "gen_tiny.yaml"))
    with EvalStore(paths.db_path(lanner_home)) as store:
        run_id = store.save(run, "", adapter=adapter)
        kept = store.get(run_id).provenance["config"]["adapter"]
    assert kept == {"path": str(adapter.resolve()),
                    "sha256": hashlib.sha256(b"weights").hexdigest()}
    assert main(["eval", "show", run_id]) == 0
    assert f"adapter: {adapter.resolve()} (sha256 " in capsys.readouterr().out


def test_cli_errors_name_the_problem(capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "smollm2"]) == 2
    assert "--task" in capsys.readouterr().err
    assert main(["eval", "show", "ffff"]) == 2
    assert "no evaluation run 'ffff'" in capsys.readouterr().err
    assert main(["eval", "smollm2", "--task", "no-such-task"]) == 2
    assert "no task named 'no-such-task'" in capsys.readouterr().err


def test_list_shows_bundled_tasks_with_licences(capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "--list", "--include-path", str(DATA), "--json"]) == 0
    tasks = {t["task"]: t for t in json.loads(capsys.readouterr().out)}
    assert tasks["lanner_mc_tiny"]["output_type"] == "multiple_choice"


def test_chat_template_sends_one_user_turn_in_the_models_format(lanner_home: Path) -> None:
    model = Engine(lanner_home).attach("fake", FakeBackend(_answers))
    task = load_task(DATA / "gen_tiny.yaml")
    result = runner.evaluate(model, task, limit=3, chat=True)
    sent = model.backend.detokenize(model.backend.requests[0].prompt)
    assert sent.startswith("<|im_start|>user\nQuestion: What is 2 plus 3?\nAnswer:<|im_end|>\n")
    assert sent.endswith("<|im_start|>assistant\n")
    assert "<|im_end|>" in model.backend.requests[0].stop  # the format's end of turn
    assert result.chat and result.items[0].scores["exact_match,number"] == 1.0
    with EvalStore(paths.db_path(lanner_home)) as store:
        record = store.get(store.save(result, ""))
    assert record.provenance["chat_format_hash"] == model.chat_format.template_hash
    with pytest.raises(NotSupported, match="generate_until tasks"):
        runner.evaluate(model, load_task(DATA / "mc_tiny.yaml"), chat=True)

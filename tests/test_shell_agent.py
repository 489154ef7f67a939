"""The shell agent on the scripted fake backend: confirmation, outputs fed back,
step limit, paths outside the working folder, --yes confinement, the CLI."""

from __future__ import annotations

import argparse
import builtins
import shutil
from pathlib import Path

import pytest

from lanner import paths
from lanner.backends.fake import FakeBackend
from lanner.cli import do, options
from lanner.engine.engine import Engine
from lanner.engine.model import Model
from lanner.errors import InvalidRequest
from lanner.store import Store
from lanner.tools.shell_agent import ShellAgent, outside_paths, parse_reply


def bash(command: str) -> str:
    return f"I will run this.\n```bash\n{command}\n```"


def agent_model(replies: list[str], home: Path) -> tuple[Model, FakeBackend]:
    backend = FakeBackend(replies)
    return Engine(home).attach("fake", backend), backend


def prompt_of(backend: FakeBackend, i: int) -> str:
    return backend.detokenize(list(backend.requests[i].prompt))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def never(command: str, outside: list[str]) -> bool:
    raise AssertionError(f"asked about {command!r}")


def test_commands_run_after_yes_and_outputs_go_back(work: Path, lanner_home: Path) -> None:
    model, backend = agent_model([bash("echo hello > greeting.txt"), bash("cat greeting.txt"),
                                  "DONE: wrote greeting.txt"], lanner_home)
    asked: list[str] = []
    agent = ShellAgent(model, work, confirm=lambda c, o: asked.append(c) or True)
    result = agent.run("Write hello into greeting.txt")
    assert asked == ["echo hello > greeting.txt", "cat greeting.txt"]
    assert (work / "greeting.txt").read_text() == "hello\n"
    assert [s.exit_code for s in result.steps] == [0, 0]
    assert result.summary == "wrote greeting.txt" and result.stopped == "done"
    assert "Exit status 0." in prompt_of(backend, 1)
    assert "```\nhello\n```" in prompt_of(backend, 2)  # the output of cat came back
    assert str(work) in prompt_of(backend, 0)  # the model is told its working folder


def test_declined_commands_do_not_run(work: Path, lanner_home: Path) -> None:
    model, backend = agent_model([bash("touch made.txt"), "DONE: nothing"], lanner_home)
    result = ShellAgent(model, work, confirm=lambda c, o: False).run("Make a file")
    assert not (work / "made.txt").exists()
    assert not result.steps[0].ran
    assert "The user declined to run that command." in prompt_of(backend, 1)


def test_q_stops_the_agent(work: Path, lanner_home: Path) -> None:
    model, backend = agent_model([bash("ls"), bash("ls")], lanner_home)
    result = ShellAgent(model, work, confirm=lambda c, o: None).run("List")
    assert result.stopped == "user" and len(backend.requests) == 1


def test_step_limit(work: Path, lanner_home: Path) -> None:
    model, backend = agent_model([bash("echo again")], lanner_home)
    result = ShellAgent(model, work, confirm=lambda c, o: True, max_steps=3).run("Loop")
    assert result.stopped == "max_steps" and len(result.steps) == 3
    assert len(backend.requests) == 3


def test_a_slow_command_is_stopped(work: Path, lanner_home: Path) -> None:
    model, _ = agent_model([bash("sleep 30"), "DONE: ok"], lanner_home)
    result = ShellAgent(model, work, confirm=lambda c, o: True, timeout_s=0.5).run("Wait")
    assert "[stopped after 0.5 s]" in result.steps[0].output


def test_yes_runs_inside_commands_without_asking_but_confined(work: Path,
                                                              lanner_home: Path) -> None:
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is not installed; run `make install`")
    # No path in the text: the check cannot see that it writes outside the folder,
    # beside it (the host's /tmp, private in the view) and at the root.
    sneaky = ("python3 -c \"import os; os.chdir(os.pardir); open('escaped.txt', 'w')\"; "
              "python3 -c \"import os; os.chdir(os.sep); open('escaped.txt', 'w')\"; "
              "echo inside > inside.txt")
    model, _ = agent_model([bash(sneaky), "DONE: ok"], lanner_home)
    result = ShellAgent(model, work, confirm=never, yes=True).run("Try")
    assert result.steps[0].ran and not result.steps[0].asked
    assert "Read-only file system" in result.steps[0].output
    assert not (work.parent / "escaped.txt").exists()
    assert not Path("/escaped.txt").exists()
    assert (work / "inside.txt").read_text() == "inside\n"


def test_outside_paths_need_approval_every_time_even_with_yes(work: Path,
                                                              lanner_home: Path) -> None:
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is not installed; run `make install`")
    target = work.parent / "outside.txt"
    model, _ = agent_model([bash(f"touch {target}"), bash(f"touch {target}"), "DONE: no"],
                           lanner_home)
    asked: list[list[str]] = []
    result = ShellAgent(model, work, confirm=lambda c, o: asked.append(o) or False,
                        yes=True).run("Touch outside")
    assert asked == [[str(target)], [str(target)]]
    assert not target.exists() and not any(s.ran for s in result.steps)


def test_every_model_call_is_logged(work: Path, lanner_home: Path) -> None:
    model, _ = agent_model([bash("echo hi"), "DONE: said hi"], lanner_home)
    with Store(paths.db_path(lanner_home)) as store:
        result = ShellAgent(model, work, confirm=lambda c, o: True, store=store).run("Say hi")
        turns = store.turns()
        assert turns[0].id == result.turn_id and turns[0].response == "said hi"
        assert turns[0].prompt == "Say hi"
        assert [t.sampling["step"] for t in turns[1:]] == ["shell step 1", "shell step 2"]
        assert all(t.parent_id == result.turn_id for t in turns[1:])


@pytest.mark.parametrize(("command", "outside"), [
    ("ls -la", []),
    ("mkdir -p a/b && cd a && ls 2>/dev/null", []),
    ("cat sub/../notes.txt", []),
    ("curl -s https://example.com/x -o page.html", []),
    ("rm -rf /", ["/"]),
    ("cat ../secret", ["../secret"]),
    ("cp notes ~/notes", ["~/notes"]),
    ("echo $HOME", ["$HOME"]),
    ("cd", ["cd (home folder)"]),
    ("dd if=zero of=/dev/sda", ["/dev/sda"]),
    ("python3 -c \"open('/etc/passwd').read()\"", ["/etc/passwd"]),
    ("echo 'unclosed", ["(the command's quoting cannot be parsed)"]),
])
def test_outside_paths(work: Path, command: str, outside: list[str]) -> None:
    assert outside_paths(command, work) == outside


def test_outside_paths_allow_absolute_paths_inside(work: Path) -> None:
    assert outside_paths(f"ls {work}/x {work}", work) == []


@pytest.mark.parametrize(("reply", "parsed"), [
    ("Let me look.\n```bash\nls -la\n```\nThen more.", ("ls -la", "")),
    ("```\npwd\n```", ("pwd", "")),
    ("```sh\nset -e\nmake\n```", ("set -e\nmake", "")),
    ("DONE: built it", (None, "built it")),
    ("All done, nothing else to run.", (None, "All done, nothing else to run.")),
    ("DONE: ok\n```bash\nls\n```", (None, "ok\n```bash\nls\n```")),
])
def test_parse_reply(reply: str, parsed: tuple[str | None, str]) -> None:
    assert parse_reply(reply) == parsed


# -- the CLI verb -----------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home")
    do.register(parser.add_subparsers())
    return parser.parse_args(list(argv))


def test_cli_yes_needs_workdir() -> None:
    with pytest.raises(InvalidRequest, match="--workdir"):
        do.run(parse("do", "clean up", "--yes"))


def test_cli_asks_runs_and_prints_the_summary(work: Path, lanner_home: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = agent_model([bash("echo made > made.txt"), "DONE: made made.txt"], lanner_home)
    monkeypatch.setattr(options, "load_model", lambda args, name, streams=None: model)
    questions: list[str] = []
    monkeypatch.setattr(builtins, "input", lambda q="": questions.append(q) or "y")
    assert do.run(parse("--home", str(lanner_home), "do", "make a file",
                        "--workdir", str(work))) == 0
    out, err = capsys.readouterr()
    assert questions == [do.QUESTION]
    assert out == "made made.txt\n"
    assert "$ echo made > made.txt" in err and "[exit status 0]" in err
    assert (work / "made.txt").read_text() == "made\n"

"""The document verbs as a user types them: ingest, collections, forget, ask,
and chat --collection (models scripted with the fake backend, or SmolLM2)."""

from __future__ import annotations

import argparse
import builtins
import io
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lanner.backends.fake import FakeBackend
from lanner.cli import ask, chat, collections, forget, ingest, options
from lanner.engine.engine import Engine
from lanner.errors import InvalidRequest

CHAINS = "Clean the chain every 300 kilometres with a degreaser, then oil it lightly."
DOC = f"# Bicycle care\n\n## Chains\n\n{CHAINS}\n\n## Tyres\n\nPump road tyres to 6 bar.\n"
TOWER = "# The Eiffel Tower\n\nThe Eiffel Tower was finished in 1889. It is 330 metres tall.\n"


def lanner(*argv: str) -> int:
    """``lanner ARGV`` with this issue's verbs, in process (exit code back)."""
    parser = argparse.ArgumentParser(prog="lanner")
    parser.add_argument("--home", default=None)
    sub = parser.add_subparsers(dest="verb")
    for verb in (ingest, ask, collections, forget, chat):
        verb.register(sub)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "bikes.md").write_text(DOC)
    (folder / "tower.md").write_text(TOWER)
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 truncated")
    return folder


def use_fake_model(monkeypatch: pytest.MonkeyPatch, reply: Callable[[str], str]) -> FakeBackend:
    backend = FakeBackend(reply, n_ctx=20000)
    model = Engine().attach("fake", backend)
    monkeypatch.setattr(options, "load_model", lambda args, name, streams=None: model)
    monkeypatch.setattr(options, "start_loading",  # run and chat
                        lambda args, name, streams=None: lambda: model)
    return backend


def number_of(prompt: str, heading: str) -> int:
    found = re.search(rf"^\[(\d+)\] \S+ \([^)]*{heading}\)$", prompt, re.MULTILINE)
    assert found, prompt
    return int(found.group(1))


def test_ingest_collections_and_forget(docs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert lanner("ingest", str(docs), "-c", "bikes") == 0
    out, err = capsys.readouterr()
    assert "Collection 'bikes'" in out and "2 added" in out and "1 skipped" in out
    assert f"skipped {docs / 'broken.pdf'}: not a readable pdf file" in err

    assert lanner("ingest", str(docs), "-c", "bikes") == 0
    assert "0 added, 0 updated, 2 unchanged" in capsys.readouterr().out

    assert lanner("collections") == 0
    assert re.search(r"^bikes\s+2\s+3\s+bundled$", capsys.readouterr().out, re.MULTILINE)

    (docs / "tower.md").write_text(TOWER + "\nRepainted in 2024.\n")
    (docs / "bikes.md").unlink()
    assert lanner("collections", "bikes") == 0
    listing = capsys.readouterr().out
    assert re.search(rf"^changed .* {re.escape(str(docs / 'tower.md'))}$", listing, re.M)
    assert re.search(rf"^missing .* {re.escape(str(docs / 'bikes.md'))}$", listing, re.M)

    assert lanner("forget", "--missing", "-c", "bikes") == 0
    assert capsys.readouterr().out == f"forgot {docs / 'bikes.md'}\n"
    assert lanner("forget", "--drop", "-c", "bikes") == 0
    assert lanner("collections", "--json") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == []


def test_forget_needs_exactly_one_target() -> None:
    with pytest.raises(InvalidRequest, match="give files to remove, or --missing, or --drop"):
        lanner("forget", "-c", "bikes")


def test_ask_prints_checked_citations_and_sources(
    docs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    def reply(prompt: str) -> str:
        chains = number_of(prompt, "Chains")
        return f"Clean it every 300 kilometres [{chains}]. Oil it with olive oil [{chains}]."

    use_fake_model(monkeypatch, reply)
    lanner("ingest", str(docs))
    capsys.readouterr()
    assert lanner("ask", "How often should I clean the chain?", "-k", "2", "--show-context") == 0
    out = capsys.readouterr().out
    context, answer = out.split("----- answer -----\n")
    assert CHAINS in context and "Question: How often should I clean the chain?" in context
    first = answer.splitlines()[0]
    assert re.fullmatch(r"Clean it every 300 kilometres \[(\d)\]\. "
                        r"Oil it with olive oil \[\1\?\]\.", first), first
    # "# Bicycle care" has no text of its own: it opens the Chains chunk.
    span = f"{docs / 'bikes.md'}, characters 0-{DOC.index(CHAINS) + len(CHAINS)}"
    assert f"{span} (Bicycle care > Chains) - cited" in answer
    assert "Unverified citations" in answer and "missing: olive" in answer


class Terminal(io.StringIO):
    """A terminal's stdout that records each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_ask_on_a_terminal_prints_the_answer_as_it_is_written(
    docs: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    answer = "It is 330 metres tall [1]. It is painted gold [1]."
    use_fake_model(monkeypatch, lambda prompt: answer)
    lanner("ingest", str(docs / "tower.md"), "-c", "paris")
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert lanner("ask", "How tall is the tower?", "-c", "paris", "--no-log") == 0
    sources = next(i for i, w in enumerate(terminal.writes) if "Sources:" in w)
    # the model's words, in pieces, before the check: unmarked, then the sources
    # and the flagged citation listed
    assert "".join(terminal.writes[:sources]).strip() == answer
    assert len([w for w in terminal.writes[:sources] if w.strip()]) > 2
    rest = "".join(terminal.writes[sources:])
    assert f"[1] {docs / 'tower.md'}, characters 0-" in rest
    assert "[1?] passage [1] shares only" in rest and "It is painted gold" in rest


def test_ask_json_and_a_clean_error_for_an_unknown_collection(
    docs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    use_fake_model(monkeypatch, lambda prompt: "It is 330 metres tall [1].")
    lanner("ingest", str(docs / "tower.md"), "-c", "paris")
    capsys.readouterr()
    assert lanner("ask", "How tall is the tower?", "-c", "paris", "--json", "--no-log") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["citations"][0]["verified"] is True
    assert data["sources"][0]["path"] == str(docs / "tower.md")
    with pytest.raises(InvalidRequest, match=r"no collection named 'nope' \(known: paris\)"):
        lanner("ask", "anything", "-c", "nope")


def test_chat_with_a_collection_rewrites_follow_ups(
    docs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    def reply(prompt: str) -> str:
        if "Standalone question:" in prompt:
            return "How tall is the Eiffel Tower?"
        return "It is 330 metres tall [1]." if "Eiffel" in prompt else "I do not know."

    backend = use_fake_model(monkeypatch, reply)
    lanner("ingest", str(docs))
    lines = iter(["When was the Eiffel Tower finished?", "And how tall is it?"])

    def fake_input(prompt: str = "") -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    capsys.readouterr()
    assert lanner("chat", "--collection", "default", "-v", "--temperature", "0") == 0
    out, err = capsys.readouterr()
    assert "[retrieval query: When was the Eiffel Tower finished?]" in err
    assert "[retrieval query (rewritten): How tall is the Eiffel Tower?]" in err
    assert "It is 330 metres tall [1]." in out
    assert f"[1] {docs / 'tower.md'}, characters 0-" in err
    # The history holds what the user typed, not the passages.
    last_prompt = backend.detokenize(list(backend.requests[-1].prompt))  # type: ignore[arg-type]
    assert last_prompt.count("Question:") == 1


@pytest.mark.slow
def test_ask_with_the_bundled_smollm2(docs: Path, smollm2_gguf: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    lanner("ingest", str(docs))
    capsys.readouterr()
    assert lanner("ask", "How tall is the Eiffel Tower?", "-k", "2", "--temperature", "0",
                  "--max-tokens", "40") == 0
    out = capsys.readouterr().out
    assert "Sources:" in out and f"[1] {docs / 'tower.md'}, characters 0-" in out

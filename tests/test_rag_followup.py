"""Follow-ups that survive a weak rewriter (a rewrite that answers or invents
is not used; the follow-up as typed and the previous question are searched
too, fused), ``-v`` listing every query, and the sentences extracted from the
top passages when an answer cites nothing."""

from __future__ import annotations

import builtins
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

import browserkit
from lanner.backends.fake import FakeBackend
from lanner.engine.engine import Engine
from lanner.engine.model import Model
from lanner.rag.answer import Prepared, Source, extract, finish
from lanner.rag.embed import LocalEmbedder
from lanner.rag.library import Library
from lanner.rag.rewrite import Queries, check_rewrite, clean_rewrite
from lanner.server.app import create_app
from serverkit import serving
from test_rag_cli import lanner, use_fake_model
from test_rag_store import make_library, pg_server  # noqa: F401 - pg_server is a fixture

browser = browserkit.browser

SQL = ("# Fine-tuning the SQL model\n\nJeremy used Axolotl to fine-tune the SQL model on one "
       "rented GPU. The training took three days and cost about 40 dollars.\n")
PUPPY = ("# Puppy school\n\nThe answer to most questions about puppies is patience. The "
         "training took 20 days at the kennel, and after 20 days the puppy could sit.\n")
BIKES = "# Bicycle care\n\nClean the chain every 300 kilometres with a degreaser.\n"

FIRST = "Which tool did Jeremy use to fine-tune the SQL model?"
FOLLOW_UP = "How long did the training take?"
ANSWERING = "The answer to this question is: The training took 20 days."
HISTORY = [{"role": "user", "content": FIRST},
           {"role": "assistant", "content": "Jeremy used Axolotl [1]."}]


def write_docs(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    for name, text in (("sql.md", SQL), ("puppy.md", PUPPY), ("bikes.md", BIKES)):
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> LocalEmbedder:
    # Not in the first test's home (gone once that test passes); the exact runtime.
    return LocalEmbedder(runtime="torch", home=tmp_path_factory.mktemp("embedder-home"))


@pytest.fixture(params=["sqlite", "postgresql"])
def library(request: pytest.FixtureRequest, tmp_path: Path,
            embedder: LocalEmbedder) -> Iterator[Library]:
    lib = make_library(request, tmp_path, embedder)
    lib.ingest([write_docs(tmp_path / "docs")], "docs")
    yield lib
    lib.close()


def rewriter(rewrite: str, answer: str = "I do not know.") -> Callable[[str], str]:
    """A scripted model: ``rewrite`` to the rewriting prompt, else ``answer``."""
    return lambda prompt: rewrite if "Standalone question:" in prompt else answer


def fake_model(reply: Callable[[str], str]) -> Model:
    return Engine().attach("fake", FakeBackend(reply, n_ctx=20000))


def top_file(prepared: Prepared) -> str:
    return Path(prepared.sources[0].path).name


# -- retrieval for a follow-up ------------------------------------------------------------


def test_a_rewriter_that_answers_is_not_used_and_the_follow_up_still_finds_its_passage(
        library: Library) -> None:
    # What the invented sentence alone finds: the puppy's 20 days of training.
    assert Path(library.search(ANSWERING, "docs", k=1)[0].chunk.path).name == "puppy.md"
    prepared = library.prepare(fake_model(rewriter(ANSWERING)), FOLLOW_UP, "docs", k=1,
                               history=HISTORY)
    assert prepared.retrieval is not None
    assert prepared.retrieval.rejected == "it answers instead of asking"
    assert prepared.queries == [FOLLOW_UP, FIRST]
    assert prepared.query == FOLLOW_UP
    assert top_file(prepared) == "sql.md" and "three days" in prepared.sources[0].text


def test_a_good_rewrite_is_used_with_the_follow_up_and_the_previous_question(
        library: Library) -> None:
    rewrite = "How long did the training of the SQL model take?"
    prepared = library.prepare(fake_model(rewriter(rewrite)),
                               FOLLOW_UP, "docs", k=1, history=HISTORY)
    assert prepared.retrieval is not None and prepared.retrieval.rejected == ""
    assert prepared.query == rewrite
    assert prepared.queries == [rewrite, FOLLOW_UP, FIRST]
    assert top_file(prepared) == "sql.md"


def test_a_first_question_asks_no_rewriter_and_searches_only_itself(library: Library) -> None:
    backend = FakeBackend(rewriter("never asked"), n_ctx=20000)
    prepared = library.prepare(Engine().attach("fake", backend), FIRST, "docs", k=1)
    assert backend.requests == [] and prepared.queries == [FIRST]


def test_known_words_are_the_ones_the_collections_keyword_index_matches(
        library: Library) -> None:
    assert library.known_words("docs", ["axolotl", "kubernetes", "kennel"]) == {
        "axolotl", "kennel"}


@pytest.mark.parametrize(("rewrite", "reason"), [
    ("How long did the training of the SQL model take?", ""),
    ("How long did the Axolotl training take?", ""),  # a word from the documents
    ("", "empty"),
    ("The answer is three days.", "it answers instead of asking"),
    ("The training took three days.", "it is a statement, not a question"),
    ("Which tool did Jeremy use to fine-tune the SQL model?",
     "it leaves out the follow-up's words: long, take, train"),
    ("How long did the Kubernetes migration training take?",
     "it brings in words found in neither the conversation nor the documents: "
     "kubernetes, migration"),
])
def test_a_rewrite_is_checked_against_the_conversation_and_the_documents(
        rewrite: str, reason: str) -> None:
    documents = {"axolotl", "gpu", "days"}
    asked: list[list[str]] = []

    def known(words: Any) -> set[str]:
        asked.append(list(words))
        return {w for w in words if w in documents}

    assert check_rewrite(rewrite, FOLLOW_UP, HISTORY, known) == reason
    if reason.startswith("it brings in"):
        assert asked == [["kubernetes", "migration"]]  # one look-up, only the new words


def test_a_question_in_another_language_needs_its_question_mark() -> None:
    history = [{"role": "user", "content": "Come si fa il ragù della domenica?"}]
    assert check_rewrite("Per quanto tempo cuoce il ragù della domenica?",
                         "Per quanto tempo cuoce?", history, lambda words: set()) == ""


def test_the_rewrite_is_its_first_line_up_to_the_question_mark() -> None:
    assert clean_rewrite('Standalone question: "How long did it take?" It took 3 days.\nMore') \
        == "How long did it take?"
    assert clean_rewrite("\n\n") == ""


def test_describe_names_each_query_and_the_rejected_rewrite() -> None:
    queries = Queries(FOLLOW_UP, ANSWERING, "it answers instead of asking", FIRST)
    assert queries.describe() == [
        f"retrieval query (as typed): {FOLLOW_UP}",
        f"retrieval query (previous question): {FIRST}",
        f"rewrite not used (it answers instead of asking): {ANSWERING}"]
    assert Queries(FIRST).describe() == [f"retrieval query: {FIRST}"]


# -- -v on the command line ----------------------------------------------------------------------


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    return write_docs(tmp_path / "docs")


def test_chat_v_lists_every_query_and_the_rejected_rewrite(
    docs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    use_fake_model(monkeypatch, rewriter(ANSWERING, "It took three days [1]."))
    lanner("ingest", str(docs))
    lines = iter([FIRST, FOLLOW_UP])

    def fake_input(prompt: str = "") -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    capsys.readouterr()
    assert lanner("chat", "--collection", "default", "-v", "--temperature", "0") == 0
    err = capsys.readouterr().err
    assert f"[retrieval query: {FIRST}]" in err
    assert f"[retrieval query (as typed): {FOLLOW_UP}]\n" \
        f"[retrieval query (previous question): {FIRST}]\n" \
        f"[rewrite not used (it answers instead of asking): {ANSWERING}]" in err


def test_ask_v_shows_the_query(docs: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    use_fake_model(monkeypatch, rewriter("unused", "It took three days [1]."))
    lanner("ingest", str(docs))
    capsys.readouterr()
    assert lanner("ask", FOLLOW_UP, "-v", "--no-log") == 0
    assert f"[retrieval query: {FOLLOW_UP}]" in capsys.readouterr().err


# -- an answer that cites nothing ------------------------------------------------------------


def source(number: int, text: str, start: int = 0) -> Source:
    return Source(number, f"/docs/{number}.md", None, start, start + len(text), "", text, 0.0)


def test_extract_takes_the_best_matching_sentence_of_each_top_passage() -> None:
    sql = SQL[SQL.index("Jeremy"):]
    sources = [source(1, sql, SQL.index("Jeremy")), source(2, BIKES),
               source(3, "# Training\n\n- The training took 20 days."),
               source(4, "The training took one hour.")]
    found = extract(FOLLOW_UP, sources)
    # Passage 2 shares no word with the question; passage 4 is past the top three.
    assert [(e.number, e.text) for e in found] == [
        (1, "The training took three days and cost about 40 dollars."),
        (3, "The training took 20 days.")]
    assert SQL[found[0].start:found[0].end] == found[0].text  # a span in the source file


def test_an_answer_that_cites_nothing_carries_extracts_and_one_that_cites_does_not() -> None:
    prepared = Prepared(FOLLOW_UP, FOLLOW_UP, [source(1, SQL)], [])
    uncited = finish(prepared, "I do not know.")
    assert [e.text for e in uncited.extracted] == [
        "The training took three days and cost about 40 dollars."]
    assert uncited.to_json()["extracted"][0]["number"] == 1
    assert finish(prepared, "It took three days [1].").extracted == []


def test_ask_prints_extracted_sentences_when_the_answer_cites_nothing(
    docs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    use_fake_model(monkeypatch, rewriter("unused", "Training is fun."))
    lanner("ingest", str(docs))
    capsys.readouterr()
    assert lanner("ask", FOLLOW_UP, "-k", "2", "--no-log") == 0
    out = capsys.readouterr().out
    assert "The answer cites no passage" in out
    _, _, extracted = out.partition("What the top passages say (extracted from the "
                                    "documents, not the model's words):\n")
    assert '] "The training took three days and cost about 40 dollars."\n' in extracted
    assert '] "The training took 20 days at the kennel, and after 20 days the puppy could ' \
        'sit."\n' in extracted


def test_the_server_returns_the_queries_and_extracts_and_logs_the_queries(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    with Library.open(home=home) as library:
        library.ingest([write_docs(tmp_path / "docs")], "notes")
    engine = Engine(home)
    engine.attach("fake", FakeBackend(rewriter(ANSWERING, "Dogs are nice."), n_ctx=20000))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("uvicorn.error")
    with serving(create_app(engine, ["fake"], embedder=None)) as live:
        level = log.level
        log.setLevel(logging.INFO)  # after uvicorn set its own level
        log.addHandler(handler)
        try:
            client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="x")
            reply = client.chat.completions.create(
                model="fake", messages=[*HISTORY, {"role": "user", "content": FOLLOW_UP}],
                extra_body={"collection": "notes", "passages": 2})
        finally:
            log.removeHandler(handler)
            log.setLevel(level)
    citations = reply.model_extra["citations"]  # type: ignore[index]
    assert citations["retrieval"]["used"] == [FOLLOW_UP, FIRST]
    assert citations["retrieval"]["rejected"] == "it answers instead of asking"
    assert citations["citations"] == []
    assert citations["extracted"][0]["text"] == \
        "The training took three days and cost about 40 dollars."
    logged = [r.getMessage() for r in records]
    assert f"Documents notes: retrieval query (as typed): {FOLLOW_UP}; retrieval query " \
        f"(previous question): {FIRST}; rewrite not used (it answers instead of asking): " \
        f"{ANSWERING}" in logged
    json.dumps(citations)  # plain JSON all the way down


@browserkit.needs_chromium
def test_the_web_ui_shows_the_extracted_sentences_of_an_uncited_answer(
        tmp_path: Path, browser: Any) -> None:
    home = tmp_path / "home"
    with Library.open(home=home) as library:
        library.ingest([write_docs(tmp_path / "docs")], "notes")
    engine = Engine(home)
    engine.attach("fake", FakeBackend(rewriter("unused", "Dogs are nice."), n_ctx=20000))
    with serving(create_app(engine, ["fake"], embedder=None)) as live:
        context = browser.new_context()
        page = context.new_page()
        page.goto(live.url + "/")
        expect = browserkit.expect
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        page.select_option("#chat-collection", "notes")
        page.fill("#prompt", "Which tool did Jeremy use to fine-tune the SQL model?")
        page.press("#prompt", "Enter")
        note = page.locator(".msg.assistant .extracted")
        expect(note).to_contain_text("The answer cites no passage", timeout=60_000)
        expect(note.locator("li").first).to_contain_text(
            "Jeremy used Axolotl to fine-tune the SQL model on one rented GPU.")
        note.locator("button.cite").first.click()
        expect(page.locator("#passage-dialog mark")).to_contain_text("Axolotl")
        context.close()

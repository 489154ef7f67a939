"""Cited answers: the prompt, the citation checks, follow-up rewriting, and
the whole path with a scripted model and with the bundled SmolLM2."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest

from lanner.backends.fake import FakeBackend
from lanner.chat.prompts import render_prompt
from lanner.engine.engine import Engine
from lanner.engine.model import Model
from lanner.errors import LannerError
from lanner.rag.answer import Source, build_messages, verify
from lanner.rag.embed import LocalEmbedder, RemoteEmbedder
from lanner.rag.library import Library
from lanner.rag.rewrite import rewrite_prompt
from test_rag_store import make_library, pg_server  # noqa: F401 - pg_server is a fixture

BIKES = """# Bicycle care

## Chains

Clean the chain every 300 kilometres with a degreaser, then oil it lightly. A dry chain \
squeaks and wears the cassette.

## Tyres

Pump road tyres to 6 bar and check them for glass splinters after rainy rides.
"""

TOWER = """# The Eiffel Tower

The Eiffel Tower in Paris was finished in 1889 for the World's Fair. It is 330 metres tall.
"""

TREES = """# Trees in the yard

The old oak by the gate is 28 metres tall and about 300 years old.
"""


def source(number: int, text: str, heading: str = "") -> Source:
    return Source(number, f"/docs/{number}.md", None, 0, len(text), heading, text, 0.0)


# -- the prompt ---------------------------------------------------------------------


def test_the_answer_prompt_is_pinned() -> None:
    sources = [source(1, "Paris is the capital of France.", "Geography"),
               Source(2, "/docs/report.pdf", 3, 10, 30, "", "Budget: 41,500 euros.", 0.0)]
    messages = build_messages("What is the capital?", sources, system="Be brief.")
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"] == (
        "Answer the question using only the numbered passages below. After each sentence, "
        "cite the passages it comes from by number in square brackets, like [1] or [2][3]. "
        "If the passages do not contain the answer, say that you do not know.\n\n"
        "[1] 1.md (Geography)\nParis is the capital of France.\n\n"
        "[2] report.pdf, page 3\nBudget: 41,500 euros.\n\n"
        "Question: What is the capital?\n")


def test_the_rewrite_prompt_is_pinned() -> None:
    history = [{"role": "system", "content": "ignored"},
               {"role": "user", "content": "Tell me about the Eiffel Tower."},
               {"role": "assistant", "content": "It is in Paris."}]
    assert rewrite_prompt(history, "How tall is it?") == (
        "Rewrite the last question of this conversation so that it can be understood on its "
        "own, without the conversation: replace words like \"it\", \"they\" or \"that\" with "
        "what they refer to. Reply with the rewritten question only.\n\n"
        "User: Tell me about the Eiffel Tower.\nAssistant: It is in Paris.\n"
        "User: How tall is it?\n\nStandalone question:\n")
    assert render_prompt("rag_rewrite.jinja", turns=[], question="q").endswith(
        "User: q\n\nStandalone question:\n")


# -- citation checks ----------------------------------------------------------------------


def test_citations_are_verified_or_flagged_with_a_reason() -> None:
    sources = [source(1, "The Eiffel Tower was finished in 1889. It is 330 metres tall."),
               source(2, "Pump road tyres to 6 bar.")]
    text = ("The Eiffel Tower was finished in 1889 [1]. It is 400 metres tall [1]. "
            "Road tyres need 6 bar [2]. The tower is painted brown [2]. Bees are insects [7].")
    citations, _ = verify(text, sources)
    got = [(c.number, c.verified) for c in citations]
    assert got == [(1, True), (1, False), (2, True), (2, False), (7, False)]
    assert "does not contain 400" in citations[1].reason
    assert "missing: brown, paint, tower" in citations[3].reason
    assert citations[4].reason == "there is no passage [7] (passages given: 1-2)"
    assert citations[0].claim == "The Eiffel Tower was finished in 1889"


def test_a_marker_after_the_full_stop_belongs_to_the_sentence_before() -> None:
    sources = [source(1, "Oak burns longest."), source(2, "Birch lights fastest.")]
    citations, uncited = verify("Oak burns longest. [1] Birch lights fastest. [2]", sources)
    assert [(c.number, c.claim, c.verified) for c in citations] == [
        (1, "Oak burns longest.", True), (2, "Birch lights fastest.", True)]
    assert uncited == []


def test_a_claim_split_over_two_passages_is_checked_against_both() -> None:
    sources = [source(1, "Oak burns longest."), source(2, "Birch lights fastest."),
               source(3, "Pump tyres to 6 bar.")]
    citations, _ = verify("Oak burns longest and birch lights fastest [1][2][3].", sources)
    assert [(c.number, c.verified) for c in citations] == [(1, True), (2, True), (3, False)]


def test_marked_text_shows_unverified_citations_and_lists_uncited_claims() -> None:
    from lanner.rag.answer import Prepared, finish

    sources = [source(1, "Oak burns longest.")]
    prepared = Prepared("q", "q", sources, [])
    answer = finish(prepared, "Oak burns longest [1]. Pine smoke smells of resin [1, 4]. "
                    "Walnut trees grow slowly in cold climates.")
    assert answer.marked_text() == ("Oak burns longest [1]. Pine smoke smells of resin "
                                    "[1?, 4?]. Walnut trees grow slowly in cold climates.")
    assert answer.uncited == ["Walnut trees grow slowly in cold climates."]
    data = answer.to_json()
    assert [c["verified"] for c in data["citations"]] == [True, False, False]
    assert data["sources"][0]["path"] == "/docs/1.md"


# -- the whole path with a scripted model ---------------------------------------------------


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> LocalEmbedder:
    # Not in the first test's home (gone once that test passes); the exact runtime.
    return LocalEmbedder(runtime="torch", home=tmp_path_factory.mktemp("embedder-home"))


@pytest.fixture(params=["sqlite", "postgresql"])
def library(request: pytest.FixtureRequest, tmp_path: Path,
            embedder: LocalEmbedder) -> Iterator[Library]:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "bikes.md").write_text(BIKES)
    (docs / "tower.md").write_text(TOWER)
    (docs / "trees.md").write_text(TREES)
    lib = make_library(request, tmp_path, embedder)
    lib.ingest([docs], "docs")
    yield lib
    lib.close()


def numbers_by_heading(prompt: str) -> dict[str, int]:
    """{"Chains": 1, ...} from the passages as the prompt lists them."""
    return {m.group(2).split(" > ")[-1]: int(m.group(1))
            for m in re.finditer(r"^\[(\d+)\] \S+ \((.+)\)$", prompt, re.MULTILINE)}


def fake_model(reply: Callable[[str], str], n_ctx: int = 20000) -> tuple[Model, FakeBackend]:
    backend = FakeBackend(reply, n_ctx=n_ctx)
    return Engine().attach("fake", backend), backend


def test_answer_checks_the_citations_of_a_scripted_model(library: Library) -> None:
    def reply(prompt: str) -> str:
        n = numbers_by_heading(prompt)
        return (f"Clean the chain every 300 kilometres with a degreaser [{n['Chains']}]. "
                f"Pump road tyres to 9 bar [{n['Tyres']}]. Bees make honey [9].")

    model, _ = fake_model(reply)
    answer = library.answer(model, "How do I look after my bicycle?", "docs", k=3,
                            temperature=0)
    by_number = {s.number: s for s in answer.sources}
    checks = [(by_number.get(c.number) and by_number[c.number].heading, c.verified)
              for c in answer.citations]
    assert checks == [("Bicycle care > Chains", True), ("Bicycle care > Tyres", False),
                      (None, False)]
    marked = answer.marked_text()
    assert "9 bar [" in marked and "?]" in marked and "honey [9?]" in marked
    assert [s.number for s in answer.cited] == sorted(
        {c.number for c in answer.citations if c.number in by_number})
    chains = next(s for s in answer.sources if s.heading.endswith("Chains"))
    assert BIKES[chains.start:chains.end] == chains.text


def test_passages_that_do_not_fit_the_context_are_dropped(library: Library) -> None:
    question = "How tall is the Eiffel Tower?"
    roomy, _ = fake_model(lambda prompt: "")
    full = library.prepare(roomy, question, "docs", k=3)
    assert len(full.sources) == 3
    # One token short of room for all three passages and 200 new tokens.
    n_ctx = len(roomy.chat_request(full.messages).prompt) + 200 - 1
    tight, _ = fake_model(lambda prompt: "", n_ctx=n_ctx)
    prepared = library.prepare(tight, question, "docs", k=3, max_tokens=200)
    assert 1 <= len(prepared.sources) < 3
    assert "330 metres" in prepared.sources[0].text  # the best passage is kept
    tight.chat_request(prepared.messages, strict_context=True, max_tokens=200)  # fits


def test_a_follow_up_is_rewritten_before_retrieval(library: Library) -> None:
    def reply(prompt: str) -> str:
        if "Standalone question:" in prompt:
            return "Standalone question: How old is the Eiffel Tower?\nextra chatter"
        return f"It was finished in 1889 [{numbers_by_heading(prompt)['The Eiffel Tower']}]."

    model, backend = fake_model(reply)
    first = library.prepare(model, "Tell me about the Eiffel Tower.", "docs", k=1)
    assert first.query == "Tell me about the Eiffel Tower." and backend.requests == []
    history = [{"role": "user", "content": "How tall is the Eiffel Tower?"},
               {"role": "assistant", "content": "It is 330 metres tall [1]."}]
    answer = library.answer(model, "How old is it?", "docs", k=2, history=history)
    assert answer.query == "How old is the Eiffel Tower?"
    assert answer.retrieval is not None and answer.retrieval.used == [
        "How old is the Eiffel Tower?", "How old is it?", "How tall is the Eiffel Tower?"]
    rewrite_request = backend.detokenize(list(backend.requests[0].prompt))  # type: ignore[arg-type]
    assert "User: How tall is the Eiffel Tower?" in rewrite_request
    assert "User: How old is it?" in rewrite_request
    assert any("1889" in s.text for s in answer.sources)
    assert answer.messages[:2] == history and answer.citations[0].verified
    # Without the rewrite, the follow-up alone finds the wrong passage: the old oak.
    alone = library.search("How old is it?", "docs", k=2)
    assert "oak" in alone[0].chunk.text and not any("1889" in h.chunk.text for h in alone)


def test_asking_an_unknown_collection_names_the_known_ones(library: Library) -> None:
    from lanner.errors import InvalidRequest

    model, _ = fake_model(lambda prompt: "")
    with pytest.raises(InvalidRequest, match=r"no collection named 'nope' \(known: docs\)"):
        library.answer(model, "anything", "nope")


@pytest.mark.slow
@pytest.mark.parametrize("library", ["sqlite"], indirect=True)  # the store is tested above
def test_end_to_end_with_the_bundled_smollm2(library: Library, smollm2_gguf: Path) -> None:
    model = Engine().load("smollm2")
    answer = library.answer(model, "How tall is the Eiffel Tower?", "docs", k=2,
                            temperature=0, max_tokens=60)
    assert answer.text.strip()
    assert "330 metres" in answer.sources[0].text
    markers = re.findall(r"\[(\d+)\]", answer.text)
    assert len(answer.citations) >= len(set(markers))
    for citation in answer.citations:  # a tiny model's citations are checked like any other
        exists = any(s.number == citation.number for s in answer.sources)
        assert citation.verified <= exists


# -- a remote /v1/embeddings ----------------------------------------------------------------


class _Embeddings(BaseHTTPRequestHandler):
    calls: list[list[str]] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["model"] == "broken":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b'{"error": "out of memory"}')
            return
        self.calls.append(body["input"])
        data = [{"index": i, "embedding": [float(len(t)), 0.0, 3.0]}
                for i, t in enumerate(body["input"])]
        payload = json.dumps({"data": data}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


def test_a_remote_embedder_batches_and_normalizes() -> None:
    server = HTTPServer(("127.0.0.1", 0), _Embeddings)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        remote = RemoteEmbedder(url, "mini", batch_size=2)
        vectors = remote.embed(["abcd", "a", "", "xyz", "q"])
        assert _Embeddings.calls == [["abcd", "a"], ["", "xyz"], ["q"]]
        assert vectors.shape == (5, 3)
        np.testing.assert_allclose(vectors[0], [0.8, 0.0, 0.6], rtol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
        assert remote.spec == f"{url}#mini"
        with pytest.raises(LannerError, match="answered 500: .*out of memory"):
            RemoteEmbedder(url, "broken").embed(["x"])
    finally:
        server.shutdown()

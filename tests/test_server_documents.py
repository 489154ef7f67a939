"""The ``collection`` extension on /v1/chat/completions: cited answers from a
document collection, every citation checked, whole or streamed, through the
official client."""

from __future__ import annotations

import json
import time
from collections.abc import Generator, Iterator
from typing import Any

import httpx
import openai
import pytest

from lanner.backends.fake import FakeBackend
from lanner.engine.engine import Engine
from lanner.engine.types import Event, Request
from lanner.rag.library import Library
from lanner.server.app import create_app
from serverkit import LiveServer, serving

DOC = ("The Kelvsund lighthouse was built in 1871 after three ships were lost on the reef. "
       "Its lamp burned paraffin until electricity reached the cape in 1952.")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    home = tmp_path_factory.mktemp("home")
    docs = tmp_path_factory.mktemp("docs")
    (docs / "lighthouse.txt").write_text(DOC + "\n")
    with Library.open(home=home) as library:
        library.ingest([docs], "harbour")
    engine = Engine(home)
    engine.attach("fake", FakeBackend([REPLY], n_ctx=20000))
    SLOW[:] = [CountingBackend(["The lighthouse " * 200], n_ctx=20000, delay_s=0.01)]
    engine.attach("slow", SLOW[0])
    with serving(create_app(engine, ["fake", "slow"], embedder=None)) as live:
        yield live


REPLY = "The lighthouse was built in 1871 [1]. It was painted blue in 1990 [1]."
QUESTION = [{"role": "user", "content": "When was the lighthouse built?"}]
SLOW: list[CountingBackend] = []


class CountingBackend(FakeBackend):
    """Counts the tokens it has produced (a cancelled stream stops producing)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.produced = 0

    def stream(self, request: Request) -> Generator[Event, None, None]:
        for ev in super().stream(request):
            self.produced += 1
            yield ev


def test_answer_carries_checked_citations(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    reply = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "When was the lighthouse built?"}],
        extra_body={"collection": "harbour", "passages": 3},
    )
    citations = reply.model_extra["citations"]  # type: ignore[index]
    (source,) = citations["sources"]
    assert source["path"].endswith("lighthouse.txt") and source["number"] == 1
    # The span points at the passage the model was given, in the source's own text.
    assert "built in 1871" in source["text"]
    assert DOC[source["start"]:source["end"]] == source["text"]
    checks = {c["claim"]: c["verified"] for c in citations["citations"]}
    assert checks == {"The lighthouse was built in 1871": True,
                      "It was painted blue in 1990": False}
    # the unverifiable citation is marked in the text the user reads
    assert reply.choices[0].message.content.endswith("in 1990 [1?].")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"collection": "harbour", "tools": [{"type": "function", "function": {"name": "f"}}]},
         "collection"),
        ({"collection": "harbour", "n": 2}, "collection"),
        ({"collection": "no-such-collection"}, "collection"),
        ({"collection": "no-such-collection", "stream": True}, "collection"),
        ({"collection": "harbour", "stream": True, "passages": 0}, "passages"),
        ({"collection": "harbour", "passages": 0}, "passages"),
    ],
)
def test_bad_uses_are_400s_naming_the_field(server: LiveServer, extra: dict[str, object],
                                            param: str) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "When?"}], extra_body=extra)
    assert info.value.body["param"] == param  # type: ignore[index]


def test_a_streamed_answer_ends_with_the_same_citations(server: LiveServer) -> None:
    client = server.client()
    whole = client.chat.completions.create(
        model="fake", messages=QUESTION, extra_body={"collection": "harbour", "passages": 3})
    chunks = list(client.chat.completions.create(
        model="fake", messages=QUESTION, stream=True, stream_options={"include_usage": True},
        extra_body={"collection": "harbour", "passages": 3}))
    deltas = [c.choices[0].delta.content for c in chunks
              if c.choices and c.choices[0].delta.content]
    # the model's words as it wrote them, in pieces, before any check
    assert "".join(deltas) == REPLY and len(deltas) > 2
    (last,) = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert last.choices[0].finish_reason == "stop"
    citations = last.model_extra["citations"]  # type: ignore[index]
    assert citations == whole.model_extra["citations"]  # type: ignore[index]
    assert citations["marked_answer"] == whole.choices[0].message.content
    assert citations["marked_answer"].endswith("in 1990 [1?].")
    assert all("citations" not in (c.model_extra or {}) for c in chunks if c is not last)
    assert chunks[-1].usage is not None and chunks[-1].usage == whole.usage


def test_the_stream_helper_of_the_official_client_reads_it(server: LiveServer) -> None:
    with server.client().chat.completions.stream(
            model="fake", messages=QUESTION,  # type: ignore[arg-type]
            extra_body={"collection": "harbour"}) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == REPLY


def test_a_streamed_answer_is_logged_with_its_citations(server: LiveServer) -> None:
    cid = httpx.post(f"{server.url}/v1/lanner/conversations", json={"model": "fake"}).json()["id"]
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=30, json={
            "model": "fake", "messages": QUESTION, "stream": True, "collection": "harbour",
            "conversation_id": cid}) as reply:
        assert reply.status_code == 200
        body = reply.read().decode()
    events = [json.loads(line[6:]) for line in body.splitlines()
              if line.startswith("data: {")]
    streamed = events[-1]["citations"]
    deadline = time.monotonic() + 10
    while not (messages := httpx.get(
            f"{server.url}/v1/lanner/conversations/{cid}").json()["messages"])[1:]:
        assert time.monotonic() < deadline, "the turn was not logged"
        time.sleep(0.05)
    logged = messages[-1]
    # as a whole answer is logged: the marked text, and the citations beside it
    assert logged["content"] == streamed["marked_answer"]
    assert logged["citations"] == streamed


def test_leaving_a_streamed_answer_stops_the_model(server: LiveServer) -> None:
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=30, json={
            "model": "slow", "messages": QUESTION, "stream": True,
            "collection": "harbour"}) as reply:
        for line in reply.iter_lines():
            if '"content":"The' in line:  # the first words: the client leaves
                break
    left_at = SLOW[0].produced
    time.sleep(1.0)  # uncancelled, it would produce ~100 more tokens meanwhile
    assert SLOW[0].produced < left_at + 25

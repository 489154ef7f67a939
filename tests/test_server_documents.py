"""The ``collection`` extension on /v1/chat/completions: cited answers from a
document collection, every citation checked, through the official client."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from lanner.backends.fake import FakeBackend
from lanner.engine.engine import Engine
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
    replies = ["The lighthouse was built in 1871 [1]. It was painted blue in 1990 [1]."]
    engine = Engine(home)
    engine.attach("fake", FakeBackend(replies, n_ctx=20000))
    with serving(create_app(engine, ["fake"], embedder=None)) as live:
        yield live


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
        ({"collection": "harbour", "stream": True}, "collection"),
        ({"collection": "no-such-collection"}, "collection"),
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

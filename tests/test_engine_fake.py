"""The Model API and the logged ChatSession, driven by the scripted fake backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from lanner.backends.fake import FakeBackend
from lanner.chat.session import ChatSession
from lanner.engine.engine import Engine
from lanner.engine.types import Finish, TextDelta
from lanner.errors import ContextLengthExceeded, InvalidRequest
from lanner.store import Store


@pytest.fixture
def engine(lanner_home: Path) -> Engine:
    return Engine(lanner_home)


def test_chat_renders_template_and_stops_at_end_of_turn(engine: Engine) -> None:
    fake = FakeBackend(["Paris.<|im_end|>ignored"])
    model = engine.attach("fake", fake)
    reply = model.chat([{"role": "user", "content": "Capital of France?"}], temperature=0)
    assert reply == {"role": "assistant", "content": "Paris."}
    sent = fake.detokenize(list(fake.requests[0].prompt))
    assert sent.endswith("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_end|>" in fake.requests[0].stop


def test_generate_passes_options_through_validation(engine: Engine) -> None:
    model = engine.attach("fake", FakeBackend(["abcdef"]))
    assert model.generate("hi", max_tokens=3) == "abc"
    with pytest.raises(InvalidRequest, match="top_p"):
        model.generate("hi", top_p=2.0)
    with pytest.raises(InvalidRequest) as info:
        model.generate("hi", temprature=0.1)
    assert info.value.param == "temprature"


def test_prompt_longer_than_context_names_both_lengths(engine: Engine) -> None:
    model = engine.attach("fake", FakeBackend(["x"], n_ctx=64))
    with pytest.raises(ContextLengthExceeded) as info:
        model.generate("y" * 100)
    message = str(info.value)
    assert "64" in message and str(info.value.prompt_tokens) in message


def test_session_logs_each_turn_with_provenance(engine: Engine, lanner_home: Path) -> None:
    store = Store(lanner_home / "logs.db")
    model = engine.attach("fake", FakeBackend(["One.", "Two."]))
    session = ChatSession(model, store, system="Be brief.", options={"seed": 3})
    for text in ("first", "second"):
        events = list(session.send(text))
        assert isinstance(events[-1], Finish)
    turns = store.turns(conversation_id=session.conversation_id, limit=None)
    assert [t.response for t in sorted(turns, key=lambda t: t.id or 0)] == ["One.", "Two."]
    turn = turns[0]
    assert turn.seed == 3 and turn.sampling["seed"] == 3
    assert turn.backend == "fake" and turn.chat_format_hash
    assert session.messages[-1] == {"role": "assistant", "content": "Two."}
    assert store.conversation_messages(session.conversation_id) == session.messages


def test_cancelled_turn_is_logged_and_kept(engine: Engine, lanner_home: Path) -> None:
    store = Store(lanner_home / "logs.db")
    model = engine.attach("fake", FakeBackend(["a long answer"]))
    session = ChatSession(model, store)
    events = session.send("hi")
    first = next(events)
    assert isinstance(first, TextDelta)
    events.close()  # what Ctrl-C does in `lanner chat`
    (turn,) = store.turns(conversation_id=session.conversation_id, limit=None)
    assert turn.finish_reason == "cancelled"
    assert turn.response == first.text
    assert session.messages[-1]["content"] == first.text


def test_resume_rebuilds_the_thread(engine: Engine, lanner_home: Path) -> None:
    store = Store(lanner_home / "logs.db")
    fake = FakeBackend(["A.", "B."])
    model = engine.attach("fake", fake)
    first = ChatSession(model, store, system="sys")
    list(first.send("q1"))
    again = ChatSession.resume(model, store, first.conversation_id)
    list(again.send("q2"))
    sent = fake.detokenize(list(fake.requests[-1].prompt))
    assert "sys" in sent and "q1" in sent and "A." in sent and "q2" in sent

"""Side-by-side comparison: the service, ``lanner compare`` and
``POST /v1/lanner/compare``, on scripted fake models."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.serverkit import LiveServer, serving

from lanner import paths
from lanner.backends.fake import FakeBackend
from lanner.cli import compare as compare_cli
from lanner.cli import options
from lanner.cli.columns import Columns, side_by_side
from lanner.engine.engine import Engine
from lanner.engine.model import Model
from lanner.engine.types import Finish, TextDelta
from lanner.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound
from lanner.evals.compare import Comparison, compare
from lanner.server.app import create_app
from lanner.store import Store

REPLIES = {"alpha": "Alpha thinks the answer is four.", "beta": "Beta says: 4."}


def fake_models(engine: Engine) -> dict[str, Model]:
    return {name: engine.attach(name, FakeBackend([reply])) for name, reply in REPLIES.items()}


@pytest.fixture
def models(lanner_home: Path) -> dict[str, Model]:
    return fake_models(Engine(lanner_home))


@pytest.fixture
def store(lanner_home: Path) -> Iterator[Store]:
    with Store(paths.db_path(lanner_home)) as opened:
        yield opened


# -- the service -----------------------------------------------------------------


def test_every_answer_streams_with_its_index_and_is_logged(
    models: dict[str, Model], store: Store,
) -> None:
    comparison = Comparison(list(models.values()), "What is 2+2?", store=store,
                            system="Be brief.", options={"temperature": 0.0, "seed": 7})
    events = list(comparison.stream())
    # One model after the other, each ending with its Finish.
    assert [i for i, _ in events] == sorted(i for i, _ in events)
    assert [type(e) for i, e in events if i == 0][-1] is Finish
    text = {i: "".join(e.text for j, e in events if j == i and isinstance(e, TextDelta))
            for i in (0, 1)}
    assert text == {0: REPLIES["alpha"], 1: REPLIES["beta"]}
    for answer in comparison.answers:
        assert answer.finish is not None and answer.finish.reason == "stop"
        (turn,) = store.turns(conversation_id=answer.conversation_id)
        assert turn.id == answer.log_id
        assert (turn.model, turn.prompt, turn.response, turn.system) == \
            (answer.model, "What is 2+2?", REPLIES[answer.model], "Be brief.")
        assert turn.sampling["temperature"] == 0.0 and turn.seed == 7


def test_history_comes_before_the_prompt(models: dict[str, Model]) -> None:
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    Comparison([models["alpha"]], "And now?", store=None, history=history).run()
    backend = models["alpha"].backend
    assert isinstance(backend, FakeBackend)
    ids = backend.requests[-1].prompt
    assert not isinstance(ids, str)  # the chat path sends token ids
    sent = backend.detokenize(ids)
    assert sent.index("Hi") < sent.index("Hello") < sent.index("And now?")


def test_an_answer_cut_short_is_logged_as_cancelled(models: dict[str, Model],
                                                    store: Store) -> None:
    comparison = Comparison(list(models.values()), "Count.", store=store)
    stream = comparison.stream()
    next(stream)
    stream.close()
    first, second = comparison.answers
    (turn,) = store.turns(conversation_id=first.conversation_id)
    assert turn.finish_reason == "cancelled" and turn.id == first.log_id
    assert second.log_id is None and second.text == ""


def test_bad_options_fail_before_any_model_runs(models: dict[str, Model]) -> None:
    with pytest.raises(InvalidRequest, match="temperature"):
        Comparison(list(models.values()), "Hi", store=None, options={"temperature": -1.0})
    with pytest.raises(InvalidRequest, match="prompt"):
        Comparison(list(models.values()), "  ", store=None)
    small = Engine().attach("small", FakeBackend(n_ctx=40))
    with pytest.raises(ContextLengthExceeded, match="context window"):
        Comparison([models["alpha"], small], "x" * 100, store=None)
    assert all(not m.backend.requests for m in models.values())  # type: ignore[attr-defined]


def test_compare_by_name_loads_through_the_engine(lanner_home: Path, store: Store) -> None:
    engine = Engine(lanner_home)
    fake_models(engine)
    engine.load = lambda name, **_: {m.name: m for m in engine.loaded()}[name]  # type: ignore[method-assign]
    answers = compare(engine, ["beta", "alpha"], "Sum?", store=store).run()
    assert [a.text for a in answers] == [REPLIES["beta"], REPLIES["alpha"]]
    with pytest.raises(InvalidRequest, match="at least 2 models"):
        compare(engine, ["alpha"], "Sum?", store=store)
    with pytest.raises(ModelNotFound, match="no-such-model"):
        compare(Engine(lanner_home), ["no-such-model", "alpha"], "Sum?", store=store)


# -- columns ---------------------------------------------------------------------


def test_columns_wrap_side_by_side() -> None:
    rows = side_by_side(["left", "right"], ["one two three four five", "a\nb"], width=23)
    assert rows == ["left       | right", "---------- | ----------",
                    "one two    | a", "three four | b", "five       |"]


def test_live_columns_redraw_in_place_and_end_with_the_whole_block() -> None:
    out = io.StringIO()
    columns = Columns(["A", "B"], out, live=True)
    columns.add(0, "hello")
    columns.add(1, "world")
    columns.close()
    text = out.getvalue()
    assert "\x1b[3F\x1b[J" in text  # the second draw replaces the first block
    last = text.rsplit("\x1b[J", 1)[-1]
    assert last.splitlines()[2].split() == ["hello", "|", "world"]


# -- lanner compare --------------------------------------------------------------


def lanner(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lanner")
    parser.add_argument("--home", default=None)
    sub = parser.add_subparsers(dest="verb")
    compare_cli.register(sub)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


@pytest.fixture
def cli_models(monkeypatch: pytest.MonkeyPatch, models: dict[str, Model]) -> dict[str, Model]:
    def load(args: argparse.Namespace, name: str) -> Model:
        if name not in models:
            raise ModelNotFound(f"unknown model {name!r}")
        return models[name]

    monkeypatch.setattr(options, "load_model", load)
    return models


def test_cli_prints_answers_one_after_another_when_not_a_terminal(
    cli_models: dict[str, Model], capsys: pytest.CaptureFixture[str], lanner_home: Path,
) -> None:
    assert lanner("compare", "-m", "alpha", "-m", "beta", "What is 2+2?") == 0
    out = capsys.readouterr().out
    assert out.index("=== alpha ===") < out.index(REPLIES["alpha"]) \
        < out.index("=== beta ===") < out.index(REPLIES["beta"])
    assert "alpha: 32 tokens" in out
    with Store(paths.db_path(lanner_home)) as store:
        assert {t.model for t in store.turns()} == {"alpha", "beta"}


def test_cli_file_of_prompts_as_json(
    cli_models: dict[str, Model], capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("First question?\n\nSecond question?\n")
    assert lanner("compare", "-m", "alpha", "-m", "beta", "--file", str(prompts), "--json",
                  "--no-log") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["First question?", "Second question?"]
    assert [a["model"] for a in lines[0]["answers"]] == ["alpha", "beta"]
    assert lines[1]["answers"][1]["text"] == REPLIES["beta"]
    assert lines[0]["answers"][0]["log_id"] is None  # --no-log


@pytest.mark.parametrize(
    ("argv", "error", "words"),
    [
        (("-m", "alpha", "Hi"), InvalidRequest, ("models", "at least 2")),
        (("-m", "alpha", "-m", "nope", "Hi"), ModelNotFound, ("nope",)),
        (("-m", "alpha", "-m", "beta"), InvalidRequest, ("prompt", "--file")),
        (("-m", "alpha", "-m", "beta", "Hi", "--show-probs"), InvalidRequest, ("--show-probs",)),
        (("-m", "alpha", "-m", "beta", "Hi", "--top-p", "2"), InvalidRequest, ("top_p",)),
    ],
)
def test_cli_bad_input_is_a_clear_error(
    cli_models: dict[str, Model], argv: tuple[str, ...], error: type[Exception],
    words: tuple[str, ...],
) -> None:
    with pytest.raises(error) as caught:
        lanner("compare", *argv)
    for word in words:
        assert word in str(caught.value)


# -- POST /v1/lanner/compare -----------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    engine = Engine(tmp_path_factory.mktemp("home"))
    names = list(fake_models(engine))
    with serving(create_app(engine, names, embedder=None)) as live:
        yield live


def post(server: LiveServer, body: dict[str, object]) -> httpx.Response:
    return httpx.post(server.url + "/v1/lanner/compare", json=body, timeout=10)


def test_endpoint_returns_every_answer_with_its_log_id(server: LiveServer) -> None:
    reply = post(server, {"models": ["alpha", "beta"], "prompt": "2+2?", "temperature": 0})
    assert reply.status_code == 200, reply.text
    answers = reply.json()["answers"]
    assert [(a["index"], a["model"], a["content"]) for a in answers] == \
        [(0, "alpha", REPLIES["alpha"]), (1, "beta", REPLIES["beta"])]
    assert all(a["finish_reason"] == "stop" and a["log_id"] for a in answers)
    home = server.app.state.lanner.pool.engine.home
    with Store(paths.db_path(home)) as store:
        logged = {t.id: t for t in store.turns(limit=None)}
    assert logged[answers[1]["log_id"]].response == REPLIES["beta"]


def test_endpoint_streams_events_with_their_model_index(server: LiveServer) -> None:
    messages = [{"role": "system", "content": "Terse."}, {"role": "user", "content": "2+2?"}]
    with httpx.stream("POST", server.url + "/v1/lanner/compare", timeout=10,
                      json={"models": ["beta", "alpha"], "messages": messages,
                            "stream": True}) as reply:
        assert reply.status_code == 200
        data = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    text = {i: "".join(c.get("delta", "") for c in chunks[:-1] if c["index"] == i)
            for i in (0, 1)}
    assert text == {0: REPLIES["beta"], 1: REPLIES["alpha"]}
    finished = [c for c in chunks if "finish_reason" in c and c["object"].endswith("chunk")]
    assert [(c["index"], c["model"]) for c in finished] == [(0, "beta"), (1, "alpha")]
    assert [a["log_id"] is not None for a in chunks[-1]["answers"]] == [True, True]


# The web UI's Sampling panel, as it sends it.
SAMPLING = {"temperature": 0.3, "top_p": 0.5, "top_k": 7, "max_tokens": 6, "seed": 42}


def sampled(server: LiveServer, name: str) -> dict[str, object]:
    """The sampling settings of the last request ``name``'s backend got."""
    model = next(m for m in server.app.state.lanner.pool.engine.loaded() if m.name == name)
    request = model.backend.requests[-1]
    return {field: getattr(request, field) for field in SAMPLING}


def test_endpoint_gives_every_model_the_sampling_settings(server: LiveServer) -> None:
    reply = post(server, {"models": ["alpha", "beta"], "prompt": "2+2?", **SAMPLING})
    assert reply.status_code == 200, reply.text
    answers = reply.json()["answers"]
    assert [a["content"] for a in answers] == [REPLIES["alpha"][:6], REPLIES["beta"][:6]]
    assert [(a["finish_reason"], a["usage"]["completion_tokens"]) for a in answers] == \
        [("length", 6), ("length", 6)]
    assert sampled(server, "alpha") == sampled(server, "beta") == SAMPLING


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"models": ["alpha", "nope"], "prompt": "Hi"}, 404, None),
        ({"models": ["alpha"], "prompt": "Hi"}, 400, "models"),
        ({"models": ["alpha", "beta"]}, 400, "prompt"),
        ({"models": ["alpha", "beta"], "prompt": "Hi", "top_p": 3}, 400, "top_p"),
        ({"models": ["alpha", "beta"], "prompt": "Hi", "temperature": 2.5}, 400, "temperature"),
        ({"models": ["alpha", "beta"], "prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"models": ["alpha", "beta"], "prompt": "Hi", "top_k": -1}, 400, "top_k"),
        ({"models": ["alpha", "beta"], "prompt": "Hi", "seed": "7"}, 400, "seed"),
        ({"models": ["alpha", "beta"], "prompt": "Hi", "logprobs": True}, 400, "logprobs"),
        ({"models": ["alpha", "beta"], "messages": [{"role": "assistant", "content": "x"}]},
         400, "messages"),
    ],
)
def test_endpoint_errors_in_openai_shape(server: LiveServer, body: dict[str, object],
                                         status: int, param: str | None) -> None:
    reply = post(server, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["param"] == param
    if param:
        assert error["message"].startswith(param)

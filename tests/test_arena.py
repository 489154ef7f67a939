"""The blind arena: the service and its store, ``lanner arena`` driven by scripted
stdin, and the HTTP endpoints, on scripted fake models."""

from __future__ import annotations

import argparse
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.serverkit import LiveServer, serving

from lanner import paths
from lanner.backends.fake import FakeBackend
from lanner.cli import arena as arena_cli
from lanner.cli import options
from lanner.engine.engine import Engine
from lanner.engine.model import Model
from lanner.errors import AlreadyVoted, BattleNotFound, InvalidRequest, ModelNotFound, StoreError
from lanner.evals.arena import Arena, open_arena, pick_pair
from lanner.evals.arena_store import ArenaStore
from lanner.server.app import create_app
from lanner.store import Store

# The answers never name their model: the vote must be blind.
REPLIES = {"alpha": "Tea steeps slowly.", "beta": "Leaves unfurl in heat.",
           "gamma": "A cup, then quiet."}


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


def test_pairs_are_random_in_both_orders_and_repeatable_with_a_seed() -> None:
    names = ["alpha", "beta", "gamma"]
    pairs = {pick_pair(names, random.Random(seed)) for seed in range(40)}
    assert ("alpha", "beta") in pairs and ("beta", "alpha") in pairs and len(pairs) == 6
    assert pick_pair(names, random.Random(3)) == pick_pair(names, random.Random(3))


@pytest.mark.parametrize(("names", "words"), [
    (["alpha"], ("models", "at least 2")),
    (["alpha", "alpha"], ("models", "'alpha' is given twice")),
    ([], ("models", "at least 2")),
])
def test_pick_pair_refuses_fewer_than_two_models(names: list[str], words: tuple[str, ...]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        pick_pair(names, random.Random(0))
    for word in words:
        assert word in str(caught.value)


def test_a_battle_is_saved_with_both_logged_answers_and_voted_once(
    models: dict[str, Model], store: Store,
) -> None:
    arena = Arena(list(models.values()), store, seed=1)
    battle = arena.battle("Write about tea.", system="Short lines.", temperature=0.0)
    record = battle.run()
    assert record.winner is None and record.voted_at is None
    assert record.model_a != record.model_b
    assert (record.answer_a, record.answer_b) == (REPLIES[record.model_a],
                                                  REPLIES[record.model_b])
    logged = {t.id: t for t in store.turns(limit=None)}
    assert record.response_a is not None and record.response_b is not None
    assert (logged[record.response_a].model, logged[record.response_a].response) == \
        (record.model_a, record.answer_a)
    assert logged[record.response_b].system == "Short lines."

    voted = arena.vote(record.id, "both_bad")
    assert (voted.winner, voted.model_a, voted.prompt) == ("both_bad", record.model_a,
                                                           "Write about tea.")
    assert voted.voted_at is not None
    with pytest.raises(AlreadyVoted, match="already has a vote"):
        arena.vote(record.id, "a")
    with pytest.raises(InvalidRequest, match="winner"):
        arena.vote(record.id, "c")
    with pytest.raises(BattleNotFound):
        arena.vote("no-such-battle", "a")
    assert ArenaStore(store).votes() == [voted]  # read back, from a fresh reader too


def test_votes_become_ratings(models: dict[str, Model], store: Store) -> None:
    arena = Arena([models["alpha"], models["beta"]], store, seed=2)
    for _ in range(6):
        record = arena.battle("Tea?").run()
        arena.vote(record.id, "a" if record.model_a == "alpha" else "b")  # alpha always wins
    table = arena.ratings(rounds=100)
    assert [(r.model, r.wins, r.losses, r.votes) for r in table] == \
        [("alpha", 6, 0, 6), ("beta", 0, 6, 6)]
    assert table[0].rating > 1000 > table[1].rating


def test_an_interrupted_battle_leaves_no_record(models: dict[str, Model], store: Store) -> None:
    battle = Arena(list(models.values()), store).battle("Tea?")
    stream = battle.stream()
    next(stream)
    stream.close()
    assert battle.record is None
    with store._read() as conn:
        assert conn.execute("SELECT COUNT(*) FROM arena_battles").fetchone()[0] == 0


def test_open_arena_checks_names_before_loading(lanner_home: Path, store: Store) -> None:
    with pytest.raises(InvalidRequest, match="at least 2"):
        open_arena(Engine(lanner_home), ["alpha"], store)
    with pytest.raises(ModelNotFound, match="no-such-model"):
        open_arena(Engine(lanner_home), ["no-such-model", "other"], store)


def test_the_vote_table_refuses_an_unknown_winner(store: Store) -> None:
    with pytest.raises(StoreError, match="CHECK constraint"), store._write() as conn:
        conn.execute("INSERT INTO arena_battles (id, prompt, model_a, model_b, answer_a,"
                     " answer_b, created_at, winner, voted_at)"
                     " VALUES ('x', 'p', 'a', 'b', '', '', 'now', 'c', 'now')")


# -- lanner arena ----------------------------------------------------------------


def lanner(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lanner")
    parser.add_argument("--home", default=None)
    sub = parser.add_subparsers(dest="verb")
    arena_cli.register(sub)
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


def test_cli_arena_votes_blind_then_reveals(
    cli_models: dict[str, Model], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], tmp_path: Path, lanner_home: Path,
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Write about tea.\nAnd about coffee.\nUnused.\n")
    # A vote for A; then an unknown key, asked again, a tie; then quit.
    monkeypatch.setattr("sys.stdin", io.StringIO("a\nz\nt\nq\n"))
    assert lanner("arena", "-m", "alpha", "-m", "beta", "--file", str(prompts),
                  "--pair-seed", "4") == 0
    out = capsys.readouterr().out
    first, second, third = out.split("### Prompt ")[1:]
    for block in (first, second):
        shown, revealed = block.split("Vote: ")
        assert "alpha" not in shown and "beta" not in shown  # blind until the vote
        assert "A was " in revealed
    assert "Unknown choice 'z'" in second
    assert "Vote:" not in third
    with Store(paths.db_path(lanner_home)) as store:
        votes = ArenaStore(store).votes()
    assert [(v.prompt, v.winner) for v in votes] == [("Write about tea.", "a"),
                                                     ("And about coffee.", "tie")]
    assert f"A was {votes[0].model_a}, B was {votes[0].model_b}" in first


def test_cli_arena_asks_for_prompts_then_rates(
    cli_models: dict[str, Model], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Tea?\nx\nCoffee?\nb\n\n"))
    assert lanner("arena", "-m", "alpha", "-m", "beta", "-m", "gamma") == 0
    assert "2 vote(s) saved" in capsys.readouterr().err
    assert lanner("arena", "ratings", "--rounds", "50") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["MODEL", "RATING", "95%", "CI", "W", "L", "T", "VOTES"]
    assert sum(int(row.split()[-1]) for row in table[1:]) == 4  # two votes, two models each
    assert lanner("arena", "ratings", "--json", "--rounds", "0") == 0
    rows = json.loads(capsys.readouterr().out)
    assert sum(r["both_bad"] for r in rows) == 2 and sum(r["wins"] for r in rows) == 1


def test_cli_ratings_before_any_vote(capsys: pytest.CaptureFixture[str]) -> None:
    assert lanner("arena", "ratings") == 0
    assert "No arena votes" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "error", "words"), [
    (("-m", "alpha"), InvalidRequest, ("models", "at least 2")),
    (("-m", "alpha", "-m", "alpha"), InvalidRequest, ("twice",)),
    (("-m", "alpha", "-m", "nope"), ModelNotFound, ("nope",)),
    (("-m", "alpha", "-m", "beta", "--no-log"), InvalidRequest, ("--no-log",)),
])
def test_cli_bad_input_is_a_clear_error(cli_models: dict[str, Model], argv: tuple[str, ...],
                                        error: type[Exception], words: tuple[str, ...]) -> None:
    with pytest.raises(error) as caught:
        lanner("arena", *argv)
    for word in words:
        assert word in str(caught.value)


# -- the endpoints ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    engine = Engine(tmp_path_factory.mktemp("home"))
    names = list(fake_models(engine))
    with serving(create_app(engine, names, embedder=None)) as live:
        yield live


def call(server: LiveServer, method: str, path: str, body: object = None) -> httpx.Response:
    return httpx.request(method, server.url + "/v1/lanner/arena" + path, json=body, timeout=10)


def test_endpoints_battle_vote_reveal_and_rate(server: LiveServer) -> None:
    reply = call(server, "POST", "/battles", {"prompt": "Tea?", "models": ["alpha", "gamma"],
                                              "pick_seed": 1, "temperature": 0})
    assert reply.status_code == 200, reply.text
    battle = reply.json()
    assert set(battle["answers"].values()) == {REPLIES["alpha"], REPLIES["gamma"]}
    assert "alpha" not in reply.text and "gamma" not in reply.text  # anonymous

    voted = call(server, "POST", f"/battles/{battle['id']}/vote", {"winner": "b"})
    assert voted.status_code == 200, voted.text
    names = voted.json()
    assert {names["model_a"], names["model_b"]} == {"alpha", "gamma"}
    assert battle["answers"]["a"] == REPLIES[names["model_a"]]

    again = call(server, "POST", f"/battles/{battle['id']}/vote", {"winner": "a"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_voted"

    table = call(server, "GET", "/ratings?rounds=20").json()
    assert table["votes"] >= 1
    winner = next(r for r in table["data"] if r["model"] == names["model_b"])
    assert winner["wins"] >= 1 and winner["low"] <= winner["rating"] <= winner["high"]


def test_both_sides_of_a_battle_get_the_same_sampling_settings(server: LiveServer) -> None:
    settings = {"temperature": 0.3, "top_p": 0.5, "top_k": 7, "max_tokens": 4, "seed": 42}
    reply = call(server, "POST", "/battles", {"prompt": "Tea?", "models": ["alpha", "beta"],
                                              **settings})
    assert reply.status_code == 200, reply.text
    assert set(reply.json()["answers"].values()) == {REPLIES["alpha"][:4], REPLIES["beta"][:4]}
    loaded = {m.name: m for m in server.app.state.lanner.pool.engine.loaded()}
    for name in ("alpha", "beta"):
        request = loaded[name].backend.requests[-1]
        assert {field: getattr(request, field) for field in settings} == settings


def test_same_pick_seed_same_pair(server: LiveServer) -> None:
    body = {"prompt": "Tea?", "pick_seed": 9}
    first = call(server, "POST", "/battles", body).json()["answers"]
    assert call(server, "POST", "/battles", body).json()["answers"] == first


@pytest.mark.parametrize(("method", "path", "body", "status", "param"), [
    ("POST", "/battles", {"prompt": "Tea?", "models": ["alpha", "nope"]}, 404, None),
    ("POST", "/battles", {"prompt": "Tea?", "models": ["alpha"]}, 400, "models"),
    ("POST", "/battles", {"prompt": ""}, 400, "prompt"),
    ("POST", "/battles", {"prompt": "Tea?", "temperature": 3}, 400, "temperature"),
    ("POST", "/battles", {"prompt": "Tea?", "top_p": 0}, 400, "top_p"),
    ("POST", "/battles", {"prompt": "Tea?", "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/battles", {"prompt": "Tea?", "seed": -1}, 400, "seed"),
    ("POST", "/battles/no-such-battle/vote", {"winner": "a"}, 404, "battle_id"),
    ("GET", "/ratings?rounds=-1", None, 400, "query.rounds"),
])
def test_endpoint_errors_in_openai_shape(server: LiveServer, method: str, path: str,
                                         body: object, status: int, param: str | None) -> None:
    reply = call(server, method, path, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["param"] == param


def test_a_bad_vote_is_400_and_leaves_the_battle_open(server: LiveServer) -> None:
    battle = call(server, "POST", "/battles", {"prompt": "Tea?"}).json()
    bad = call(server, "POST", f"/battles/{battle['id']}/vote", {"winner": "alpha"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "winner" and "both_bad" in bad.text
    assert call(server, "POST", f"/battles/{battle['id']}/vote",
                {"winner": "tie"}).status_code == 200

"""LoRA adapters wherever a model runs: ``--adapter`` on the CLI verbs (through
``load_model``), and ``lanner serve``'s admin route that adds adapters as new
model names on one shared base, behind the server's API key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lanner.backends.transformers import TransformersBackend
from lanner.cli import main
from lanner.engine.engine import Engine
from lanner.errors import ModelLoadError
from lanner.server.app import create_app
from serverkit import LiveServer, serving, user
from tunekit import chat_ids, greedy, make_tiny_llama, train_adapter

KEY = "admin-key"
QUESTION = "name a colour?"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def adapters(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two adapters trained to different answers."""
    root = tmp_path_factory.mktemp("adapters")
    return {"blue": train_adapter(root / "blue", base, max_steps=15),
            "other": train_adapter(root / "other", base, max_steps=15, seed=7,
                                   learning_rate=0.03)}


@pytest.fixture(scope="module")
def answers(base: Path, adapters: dict[str, Path]) -> dict[str, list[int]]:
    """Greedy ids of the base and of each adapter, loaded alone."""
    plain = TransformersBackend(base)
    ids = chat_ids(plain, QUESTION)
    out = {"base": greedy(plain, ids)}
    for name, folder in adapters.items():
        out[name] = greedy(TransformersBackend(base, adapter=folder), ids)
    assert len({tuple(v) for v in out.values()}) == 3  # three different answers
    return out


def test_adapter_flag_on_run(base: Path, adapters: dict[str, Path],
                             capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", str(base), QUESTION, "--temperature", "0", "--max-tokens", "12", "--no-log"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--adapter", str(adapters["blue"])]) == 0
    tuned = capsys.readouterr().out
    backend = TransformersBackend(base, adapter=adapters["blue"])
    assert tuned.strip() == backend.detokenize(greedy(backend, chat_ids(backend, QUESTION))).strip()
    assert tuned != plain


def test_adapter_errors_are_clear(base: Path, adapters: dict[str, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", str(base), "hi", "--no-log", "--adapter"]
    assert main(["run", "tinycoder", "hi", "--no-log", "--backend", "llama.cpp",
                 "--adapter", str(adapters["blue"])]) == 2
    assert "llama.cpp backend cannot load a peft adapter" in capsys.readouterr().err
    assert main([*argv, str(tmp_path)]) == 1
    assert "not a peft adapter folder" in capsys.readouterr().err
    backend = TransformersBackend(base, adapter=adapters["blue"])
    with pytest.raises(ModelLoadError, match="already loaded"):
        backend.add_adapter(adapters["other"], "adapter")


@pytest.fixture
def server(base: Path, tmp_path: Path) -> Iterator[LiveServer]:
    engine = Engine(tmp_path / "home")
    app = create_app(engine, [str(base)], api_key=KEY, embedder=None)
    with serving(app) as live:
        yield live
    engine.close()


def _add(server: LiveServer, key: str, **body: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/lanner/adapters", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _answer(server: LiveServer, model: str) -> str:
    reply = server.client(KEY).chat.completions.create(
        model=model, messages=user(QUESTION), temperature=0, max_tokens=12)
    return reply.choices[0].message.content or ""


def test_admin_route_adds_adapters_that_share_the_base(
    server: LiveServer, base: Path, adapters: dict[str, Path], answers: dict[str, list[int]]
) -> None:
    assert _add(server, "wrong", name="blue", path=str(adapters["blue"]),
                base=str(base)).status_code == 401
    for name in ("blue", "other"):
        response = _add(server, KEY, name=name, path=str(adapters[name]), base=str(base))
        assert response.status_code == 201, response.text
        assert response.json()["id"] == name
    models = {m.id for m in server.client(KEY).models.list().data}
    assert {"blue", "other", str(base)} <= models

    plain = TransformersBackend(base)
    texts = {name: plain.detokenize(ids) for name, ids in answers.items()}
    # Interleaved requests: each model answers as it does alone.
    for name in ("blue", str(base), "other", "blue"):
        assert _answer(server, name) == texts["base" if name == str(base) else name]

    pool = server.app.state.lanner.pool
    shared = {id(pool.entry(n).model.backend.model) for n in ("blue", "other", str(base))}
    assert len(shared) == 1  # one copy of the base weights

    duplicate = _add(server, KEY, name="blue", path=str(adapters["blue"]), base=str(base))
    assert duplicate.status_code == 400
    listed = httpx.get(f"{server.url}/v1/lanner/adapters",
                       headers={"Authorization": f"Bearer {KEY}"}).json()
    assert {a["id"] for a in listed["data"]} == {"blue", "other"}


def test_admin_route_errors(server: LiveServer, base: Path, tmp_path: Path) -> None:
    missing = _add(server, KEY, name="x", path=str(tmp_path / "none"), base=str(base))
    assert missing.status_code == 404
    unknown_base = _add(server, KEY, name="x", path=str(tmp_path), base="no-such-model")
    assert unknown_base.status_code == 404
    extra = httpx.post(f"{server.url}/v1/lanner/adapters", timeout=10,
                       json={"name": "x", "path": "p", "base": "b", "rank": 4},
                       headers={"Authorization": f"Bearer {KEY}"})
    assert extra.status_code == 400


def test_admin_route_needs_a_key(base: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    engine = Engine(tmp_path / "home")
    with serving(create_app(engine, [str(base)], embedder=None)) as live:
        response = httpx.post(f"{live.url}/v1/lanner/adapters", timeout=10,
                              json={"name": "blue", "path": str(adapters["blue"]),
                                    "base": str(base)})
    engine.close()
    assert response.status_code == 403
    assert "--api-key" in response.json()["error"]["message"]

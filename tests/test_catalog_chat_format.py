"""The catalog's chat format for checkpoints that ship no template: recorded
in models.json by `lanner pull`, used when the model has no template of its
own, never over the model's own template or --chat-format."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from lanner.engine.engine import Engine
from lanner.errors import ChatFormatError
from test_pull import FakeHub, FakeRepo, lanner, registry


def register(home: Path, name: str, path: Path, **extra: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.json").write_text(json.dumps({name: {"path": str(path), **extra}}))


def test_registry_chat_format_serves_a_template_less_checkpoint(
        lanner_home: Path, tinycoder_gguf: Path) -> None:
    register(lanner_home, "bare", tinycoder_gguf)  # tinycoder ships no template
    with pytest.raises(ChatFormatError, match="ships no chat template"):
        _ = Engine(lanner_home).load("bare").chat_format
    register(lanner_home, "bare", tinycoder_gguf, chat_format="llama-2")
    model = Engine(lanner_home).load("bare")
    assert model.chat_format.name == "builtin:llama-2"
    text = model.chat_format.render([{"role": "user", "content": "hi"}])
    assert text.startswith("<s>[INST]") and "hi" in text
    # An explicit --chat-format still wins.
    forced = Engine(lanner_home).load("bare", chat_format="chatml")
    assert forced.chat_format.name == "builtin:chatml"


def test_the_models_own_template_wins_over_the_registry(lanner_home: Path,
                                                        smollm2_gguf: Path) -> None:
    register(lanner_home, "smol", smollm2_gguf, chat_format="llama-2")
    assert Engine(lanner_home).load("smol").chat_format.name == "model"


@pytest.fixture
def catalog_hub(tinycoder_gguf: Path) -> Iterator[str]:
    FakeHub.requests = []
    FakeHub.repos = {"tiiuae/falcon-7b-instruct": FakeRepo(
        {"falcon.gguf": tinycoder_gguf.read_bytes()}, lfs={"falcon.gguf"},
        card={"license": "apache-2.0"})}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_pull_records_the_catalogs_chat_format(catalog_hub: str, lanner_home: Path) -> None:
    pulled = lanner(lanner_home, "pull", "tiiuae/falcon-7b-instruct", endpoint=catalog_hub)
    assert pulled.returncode == 0, pulled.stderr
    entry = registry(lanner_home)["falcon"]
    assert entry["chat_format"] == "falcon"
    shown = lanner(lanner_home, "chat-format", "falcon", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["chat_format"] == "builtin:falcon"

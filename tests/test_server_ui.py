"""The routes behind the web UI, over HTTP: the page at /, served models with
their windows, conversations logged through ``conversation_id``, uploads
(names that could escape the collection's folder, oversized bodies, files that
cannot be read), and ``lanner serve --host`` without a key."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lanner.backends.fake import FakeBackend
from lanner.engine.engine import Engine
from lanner.server import routes_documents
from lanner.server.app import create_app
from serverkit import LiveServer, serving

KEY = "sekrit"


@pytest.fixture
def server(lanner_home: Path) -> Iterator[LiveServer]:
    engine = Engine(lanner_home)
    engine.attach("fake", FakeBackend(["Paris is the capital.", "It is in France."],
                                      n_ctx=4096))
    with serving(create_app(engine, ["fake"], embedder=None, api_key=KEY)) as live:
        yield live


def call(server: LiveServer, method: str, path: str, **kwargs: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}"}
    return httpx.request(method, server.url + path, headers=headers, timeout=30,
                         **kwargs)  # type: ignore[arg-type]


def test_the_page_loads_without_the_key_and_the_api_still_needs_it(server: LiveServer) -> None:
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and '<script type="module" src="/ui/js/main.js">' in page.text
    script = httpx.get(server.url + "/ui/js/api.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert httpx.get(server.url + "/v1/lanner/models").status_code == 401
    models = call(server, "GET", "/v1/lanner/models").json()["data"]
    assert models == [{"id": "fake", "loaded": True, "context_window": 4096}]


def test_answers_with_a_conversation_id_are_logged_and_reopen(server: LiveServer) -> None:
    made = call(server, "POST", "/v1/lanner/conversations", json={"model": "fake"})
    assert made.status_code == 201
    cid = made.json()["id"]
    first = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "Capital of France?"}]
    streamed = call(server, "POST", "/v1/chat/completions", json={
        "model": "fake", "messages": first, "stream": True, "conversation_id": cid})
    assert "data: [DONE]" in streamed.text
    second = [*first, {"role": "assistant", "content": "Paris is the capital."},
              {"role": "user", "content": "Where is it?"}]
    call(server, "POST", "/v1/chat/completions",
         json={"model": "fake", "messages": second, "conversation_id": cid}).raise_for_status()
    listed = _wait_for_turns(server, cid, 2)
    assert listed["title"] == "Capital of France?"
    messages = call(server, "GET", f"/v1/lanner/conversations/{cid}").json()["messages"]
    assert messages == [*second, {"role": "assistant", "content": "It is in France."}]


def test_a_malformed_conversation_id_is_a_400_naming_it(server: LiveServer) -> None:
    reply = call(server, "POST", "/v1/chat/completions", json={
        "model": "fake", "messages": [{"role": "user", "content": "Hi"}],
        "conversation_id": "../etc"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "conversation_id"


def _wait_for_turns(server: LiveServer, cid: str, turns: int) -> dict[str, object]:
    """The turn is written by a worker thread just after the answer is sent."""
    deadline = time.monotonic() + 10
    while True:
        listed = call(server, "GET", "/v1/lanner/conversations").json()["data"]
        found = next((c for c in listed if c["id"] == cid), None)
        if found and found["turns"] == turns:
            return found
        assert time.monotonic() < deadline, f"not logged: {listed}"
        time.sleep(0.05)


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "..", "/etc/evil.txt",
                                  "sub\\evil.txt", ".hidden.txt"])
def test_upload_names_cannot_leave_the_collection_folder(
    server: LiveServer, lanner_home: Path, name: str,
) -> None:
    reply = call(server, "POST", "/v1/lanner/collections/notes/files",
                 params={"filename": name}, content=b"hello")
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "filename"
    written = [p for p in lanner_home.rglob("*") if p.is_file() and "evil" in p.name]
    assert written == []


def test_an_oversized_upload_is_refused_with_the_limit(
    server: LiveServer, lanner_home: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(routes_documents, "MAX_UPLOAD_BYTES", 1024)
    reply = call(server, "POST", "/v1/lanner/collections/notes/files",
                 params={"filename": "big.txt"}, content=b"x" * 5000)
    assert reply.status_code == 413
    assert "big.txt is larger than this server's upload limit" in reply.json()["error"]["message"]
    folder = lanner_home / "uploads" / "notes"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_an_unsupported_file_type_is_refused_naming_the_file(server: LiveServer) -> None:
    reply = call(server, "POST", "/v1/lanner/collections/notes/files",
                 params={"filename": "photo.png"}, content=b"\x89PNG")
    assert reply.status_code == 400
    assert reply.json()["error"]["message"].startswith("filename: photo.png: unsupported file type")


def _serve(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lanner", "--home", str(home), "serve", *args],
                          capture_output=True, text=True, timeout=60, env=_env_without_key())


def _env_without_key() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "LANNER_API_KEY"}


def test_serving_the_network_without_a_key_refuses_and_says_how_to_add_one(
    lanner_home: Path,
) -> None:
    refused = _serve(lanner_home, "--host", "0.0.0.0", "--port", "1")
    assert refused.returncode == 2
    assert "--api-key KEY" in refused.stderr and "--no-api-key" in refused.stderr

"""`lanner pull`, `add` and `rm` against a local stand-in for the Hugging Face Hub.

The stand-in answers the few endpoints huggingface_hub calls for a pull: model
info (``/api/models/{repo}[/revision/{rev}]``), the file tree
(``/api/models/{repo}/tree/{rev}``) and file downloads (HEAD and GET
``/{repo}/resolve/{rev}/{file}``) with the headers the client checks (ETag,
X-Repo-Commit, Content-Length, X-Error-Code). No network is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LANNER = [sys.executable, "-m", "lanner"]


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)
    """Files served as LFS (sha256 in the metadata), like weights on the Hub."""
    card: dict[str, object] = field(default_factory=dict)
    wrong_sha256: set[str] = field(default_factory=set)
    """Files whose advertised sha256 is wrong (a damaged download)."""

    def sha256(self, name: str) -> str:
        digest = hashlib.sha256(self.files[name]).hexdigest()
        return digest[::-1] if name in self.wrong_sha256 else digest

    def blob_id(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def sibling(self, name: str) -> dict[str, object]:
        size = len(self.files[name])
        entry: dict[str, object] = {"rfilename": name, "size": size, "blobId": self.blob_id(name)}
        if name in self.lfs:
            entry["lfs"] = {"size": size, "sha256": self.sha256(name), "pointerSize": 134}
        return entry

    def tree_entry(self, name: str) -> dict[str, object]:
        size = len(self.files[name])
        entry: dict[str, object] = {"type": "file", "path": name, "size": size,
                                    "oid": self.blob_id(name)}
        if name in self.lfs:
            entry["lfs"] = {"oid": self.sha256(name), "size": size, "pointerSize": 134}
        return entry

    def etag(self, name: str) -> str:
        return self.sha256(name) if name in self.lfs else self.blob_id(name)


class FakeHub(BaseHTTPRequestHandler):
    repos: dict[str, FakeRepo] = {}
    requests: list[str] = []

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.requests.append(f"{self.command} {path}")
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        match = tree or api or resolve
        if match is None or match[1] not in self.repos:
            return self._error(404, "RepoNotFound")
        repo = self.repos[match[1]]
        if match[2] not in (None, "main", COMMIT):
            return self._error(404, "RevisionNotFound")
        if tree:
            return self._json([repo.tree_entry(n) for n in repo.files], body)
        if api:
            return self._json({"id": match[1], "sha": COMMIT, "private": False,
                               "cardData": repo.card,
                               "siblings": [repo.sibling(n) for n in repo.files]}, body)
        name = match[3]
        if name not in repo.files:
            return self._error(404, "EntryNotFound")
        self._send(repo.files[name], body, ETag=f'"{repo.etag(name)}"',
                   **{"Content-Type": "application/octet-stream"})

    def _json(self, obj: object, body: bool) -> None:
        self._send(json.dumps(obj).encode(), body, **{"Content-Type": "application/json"})

    def _error(self, status: int, code: str) -> None:
        data = json.dumps({"error": code}).encode()
        self.send_response(status)
        for key, value in {"X-Error-Code": code, "X-Repo-Commit": COMMIT,
                           "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send(self, data: bytes, body: bool, **headers: str) -> None:
        self.send_response(200)
        for key, value in {"X-Repo-Commit": COMMIT, "Content-Length": str(len(data)),
                           **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture
def hub(tinycoder_gguf: Path) -> Iterator[tuple[str, type[FakeHub]]]:
    gguf = tinycoder_gguf.read_bytes()
    config = json.dumps({"model_type": "llama", "hidden_size": 8}).encode()
    FakeHub.requests = []
    FakeHub.repos = {
        "tester/tiny-gguf": FakeRepo(
            {"tiny.gguf": gguf, "README.md": b"---\nlicense: apache-2.0\n---\n# tiny\n"},
            lfs={"tiny.gguf"}, card={"license": "apache-2.0"}),
        "tester/two-ggufs": FakeRepo(
            {"tiny-Q4.gguf": gguf, "tiny-Q8.gguf": gguf, "README.md": b"two"},
            lfs={"tiny-Q4.gguf", "tiny-Q8.gguf"}, card={"license": "other",
                                                        "license_name": "tiny-terms"}),
        "tester/tiny-hf": FakeRepo(
            {"config.json": config, "model.safetensors": b"\0" * 4096,
             "tokenizer.json": b"{}", "pytorch_model.bin": b"\1" * 4096, "README.md": b"hf"},
            lfs={"model.safetensors", "pytorch_model.bin"}),
        "tester/damaged": FakeRepo({"tiny.gguf": gguf}, lfs={"tiny.gguf"},
                                   wrong_sha256={"tiny.gguf"}),
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeHub
    server.shutdown()
    server.server_close()


def lanner(home: Path, *args: str, endpoint: str = "http://127.0.0.1:9", offline: str = "0",
           ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(LANNER_HOME=str(home), HF_ENDPOINT=endpoint, HF_HUB_OFFLINE=offline,
               TRANSFORMERS_OFFLINE="0", HF_HOME=str(home.parent / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                           env.get("PYTHONPATH", "")]))
    return subprocess.run([*LANNER, *args], capture_output=True, text=True, timeout=120,
                          env=env)


def last_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line; progress lines may come before it, a traceback never."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("lanner: error:"), result.stderr
    return line


def registry(home: Path) -> dict[str, dict[str, str]]:
    data: dict[str, dict[str, str]] = json.loads((home / "models.json").read_text())
    return data


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: connecting to it is refused


def test_pull_gguf_then_run_and_list(hub: tuple[str, type[FakeHub]], lanner_home: Path,
                                     tinycoder_gguf: Path) -> None:
    url, _ = hub
    pulled = lanner(lanner_home, "pull", "tester/tiny-gguf", endpoint=url)
    assert pulled.returncode == 0, pulled.stderr
    assert "pulling tester/tiny-gguf@0123456789ab" in pulled.stderr
    entry = registry(lanner_home)["tiny"]
    path = Path(entry["path"])
    assert path == (lanner_home / "models" / "tester" / "tiny-gguf" / "tiny.gguf").resolve()
    assert path.read_bytes() == tinycoder_gguf.read_bytes()
    assert entry["license"] == "apache-2.0"
    assert entry["repo"] == "tester/tiny-gguf" and entry["commit"] == COMMIT
    assert entry["revision"] == "main" and entry["source"] == f"{url}/tester/tiny-gguf"

    ran = lanner(lanner_home, "run", "tiny", "hi", "--max-tokens", "4", "--raw")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip(), "the pulled model produced no text"

    listed = lanner(lanner_home, "models")
    row = next(line for line in listed.stdout.splitlines() if line.startswith("tiny "))
    assert "2.8 MB" in row and "gguf" in row and "apache-2.0" in row and str(path) in row


def test_pull_again_is_idempotent_and_revision_is_recorded(
        hub: tuple[str, type[FakeHub]], lanner_home: Path) -> None:
    url, _ = hub
    first = lanner(lanner_home, "pull", "tester/tiny-gguf", "--name", "t1", endpoint=url)
    again = lanner(lanner_home, "pull", "tester/tiny-gguf", "--name", "t1",
                   "--revision", COMMIT, endpoint=url)
    assert first.returncode == 0 and again.returncode == 0, again.stderr
    assert list(registry(lanner_home)) == ["t1"]
    assert registry(lanner_home)["t1"]["revision"] == COMMIT
    missing = lanner(lanner_home, "pull", "tester/tiny-gguf", "--revision", "v9", endpoint=url)
    assert "no such revision" in last_error(missing)


def test_several_ggufs_need_file(hub: tuple[str, type[FakeHub]], lanner_home: Path) -> None:
    url, _ = hub
    result = lanner(lanner_home, "pull", "tester/two-ggufs", endpoint=url)
    line = last_error(result)
    assert "--file" in line and "tiny-Q4.gguf" in line and "tiny-Q8.gguf" in line
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (lanner_home / "models.json").exists()

    chosen = lanner(lanner_home, "pull", "tester/two-ggufs", "--file", "tiny-Q8.gguf",
                    endpoint=url)
    assert chosen.returncode == 0, chosen.stderr
    entry = registry(lanner_home)["tiny-q8"]
    assert entry["license"] == "tiny-terms"  # `license: other` + license_name
    assert Path(entry["path"]).name == "tiny-Q8.gguf"
    assert not Path(entry["path"]).with_name("tiny-Q4.gguf").exists()


def test_pull_hf_folder_fetches_only_safetensors_files(
        hub: tuple[str, type[FakeHub]], lanner_home: Path) -> None:
    url, fake = hub
    result = lanner(lanner_home, "pull", "tester/tiny-hf", endpoint=url)
    assert result.returncode == 0, result.stderr
    folder = lanner_home / "models" / "tester" / "tiny-hf"
    assert (folder / "model.safetensors").stat().st_size == 4096
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    assert not (folder / "pytorch_model.bin").exists()
    assert not any("pytorch_model.bin" in r for r in fake.requests)
    listed = json.loads(lanner(lanner_home, "models", "--json").stdout)
    spec = next(m for m in listed if m["name"] == "tiny-hf")
    assert spec["format"] == "safetensors" and spec["license"] == "unknown"
    assert spec["path"] == str(folder.resolve())


def test_unreachable_hub_is_one_line_and_registry_unchanged(
        lanner_home: Path, tinycoder_gguf: Path) -> None:
    assert lanner(lanner_home, "add", "mine", str(tinycoder_gguf)).returncode == 0
    before = (lanner_home / "models.json").read_bytes()
    result = lanner(lanner_home, "pull", "tester/tiny-gguf",
                    endpoint=f"http://127.0.0.1:{closed_port()}")
    line = last_error(result)
    assert "cannot reach the Hugging Face Hub" in line and "127.0.0.1" in line
    assert len(result.stderr.strip().splitlines()) == 1
    assert (lanner_home / "models.json").read_bytes() == before
    assert not (lanner_home / "models").exists()


def test_unknown_repo_and_offline_mode_are_clear(hub: tuple[str, type[FakeHub]],
                                                 lanner_home: Path) -> None:
    url, fake = hub
    bundled = lanner(lanner_home, "pull", "tester/tiny-gguf", "--name", "smollm2", endpoint=url)
    assert "bundled model's name" in last_error(bundled)
    assert fake.requests == []  # refused before asking the Hub anything
    assert "no model repo 'tester/nope'" in last_error(
        lanner(lanner_home, "pull", "tester/nope", endpoint=url))
    assert "not a Hub repo id" in last_error(lanner(lanner_home, "pull", "../etc", endpoint=url))
    no_file = lanner(lanner_home, "pull", "tester/tiny-gguf", "--file", "x.gguf", endpoint=url)
    assert "has no file 'x.gguf'" in last_error(no_file)
    offline = lanner(lanner_home, "pull", "tester/tiny-gguf", endpoint=url, offline="1")
    assert "HF_HUB_OFFLINE" in last_error(offline)
    assert not (lanner_home / "models.json").exists()


def test_damaged_download_is_deleted_and_not_registered(
        hub: tuple[str, type[FakeHub]], lanner_home: Path) -> None:
    url, _ = hub
    line = last_error(lanner(lanner_home, "pull", "tester/damaged", endpoint=url))
    assert "damaged" in line and "sha256" in line
    assert not (lanner_home / "models" / "tester" / "damaged" / "tiny.gguf").exists()
    assert not (lanner_home / "models.json").exists()


def test_add_rm_round_trip(lanner_home: Path, tinycoder_gguf: Path, tmp_path: Path) -> None:
    added = lanner(lanner_home, "add", "mine", str(tinycoder_gguf), "--license", "MIT")
    assert added.returncode == 0, added.stderr
    assert registry(lanner_home)["mine"] == {"path": str(tinycoder_gguf.resolve()),
                                             "license": "MIT",
                                             "source": "local path (lanner add)"}
    assert "MIT" in next(r for r in lanner(lanner_home, "models").stdout.splitlines()
                         if r.startswith("mine "))
    assert "already registered" in last_error(lanner(lanner_home, "add", "mine",
                                                     str(tinycoder_gguf)))
    assert "bundled" in last_error(lanner(lanner_home, "add", "smollm2", str(tinycoder_gguf)))
    (tmp_path / "notes.txt").write_text("x")
    assert ".gguf" in last_error(lanner(lanner_home, "add", "n", str(tmp_path / "notes.txt")))

    refused = lanner(lanner_home, "rm", "mine", "--delete-files")
    assert "not downloaded by Lanner" in last_error(refused)
    assert "mine" in registry(lanner_home)
    assert lanner(lanner_home, "rm", "mine").returncode == 0
    assert registry(lanner_home) == {}
    assert tinycoder_gguf.exists()
    assert "not registered" in last_error(lanner(lanner_home, "rm", "mine"))


def test_rm_delete_files_removes_a_pulled_model(hub: tuple[str, type[FakeHub]],
                                                lanner_home: Path) -> None:
    url, _ = hub
    assert lanner(lanner_home, "pull", "tester/tiny-gguf", endpoint=url).returncode == 0
    assert lanner(lanner_home, "pull", "tester/tiny-hf", endpoint=url).returncode == 0
    result = lanner(lanner_home, "rm", "tiny", "--delete-files")
    assert result.returncode == 0, result.stderr
    assert not (lanner_home / "models" / "tester" / "tiny-gguf").exists()
    assert (lanner_home / "models" / "tester" / "tiny-hf" / "config.json").exists()
    assert list(registry(lanner_home)) == ["tiny-hf"]


def test_corrupt_registry_is_a_clear_error_never_overwritten(lanner_home: Path,
                                                             tinycoder_gguf: Path) -> None:
    lanner_home.mkdir(parents=True)
    index = lanner_home / "models.json"
    index.write_text('{"mine": {"path": "/x.gguf"},')
    for args in (("models",), ("add", "other", str(tinycoder_gguf)), ("rm", "mine"),
                 ("run", "mine", "hi"), ("pull", "tester/tiny-gguf")):
        line = last_error(lanner(lanner_home, *args))
        assert str(index) in line, args
    assert index.read_text() == '{"mine": {"path": "/x.gguf"},'


def test_concurrent_registrations_keep_every_entry(lanner_home: Path,
                                                   tinycoder_gguf: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from lanner.engine.registry import add_entry, remove_entry

    names = [f"model-{i}" for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: add_entry(lanner_home, n, {"path": str(tinycoder_gguf)}), names))
    assert sorted(json.loads((lanner_home / "models.json").read_text())) == sorted(names)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: remove_entry(lanner_home, n), names[::2]))
    assert sorted(json.loads((lanner_home / "models.json").read_text())) == sorted(names[1::2])

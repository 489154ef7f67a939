"""Remote engines: a second `lanner serve` on loopback as the server, and
scripted servers (httpx MockTransport, a raw socket) for the edges: 429 with
Retry-After, 5xx, a connection dropped or stalled mid-stream."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lanner.backends.fake import FakeBackend
from lanner.backends.remote import CHARS_PER_TOKEN, RemoteBackend, RemoteConfig, normalise_url
from lanner.backends.remote_http import Retry, retry_after_s
from lanner.backends.remote_prices import ledger
from lanner.chat.session import ChatSession
from lanner.cli import main
from lanner.cli.logs import format_usage
from lanner.engine.engine import Engine
from lanner.engine.types import Request, TextDelta, collect
from lanner.errors import LannerError, NotSupported, Overloaded, RemoteError
from lanner.server.app import create_app
from lanner.store import Store
from serverkit import LiveServer, serving, user


def echo_reply(prompt: str) -> str:
    """The upstream fake's reply: what the last user turn said, reversed."""
    last = prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0]
    return f"you said: {last[::-1]}"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The remote engine: a real `lanner serve` app with a fake model ("fake")
    and the bundled tinycoder GGUF (llama.cpp) for scoring."""
    engine = Engine(tmp_path_factory.mktemp("upstream-home"))
    engine.attach("fake", FakeBackend(echo_reply))
    app = create_app(engine, ["fake", "tinycoder"], embedder=None, max_queue=8)
    with serving(app) as server:
        yield server
    engine.close()


def add(home: Path, name: str, url: str, *extra: str) -> None:
    assert main(["--home", str(home), "remote", "add", name, url, *extra]) == 0


def test_add_list_rm_through_the_cli(upstream: LiveServer, lanner_home: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    add(lanner_home, "up", upstream.url, "--model", "fake", "--context", "512")
    entry = json.loads((lanner_home / "models.json").read_text())["up"]
    assert entry["format"] == "remote" and entry["path"] == upstream.url + "/v1"
    assert entry["model"] == "fake" and entry["context"] == 512
    assert main(["--home", str(lanner_home), "remote", "list"]) == 0
    assert f"up                   fake at {upstream.url}/v1" in capsys.readouterr().out
    # A model the server does not serve is refused, naming what it serves.
    assert main(["--home", str(lanner_home), "remote", "add", "x", upstream.url,
                 "--model", "nope"]) != 0
    assert "does not serve 'nope' (it serves: fake, tinycoder)" in capsys.readouterr().err
    assert main(["--home", str(lanner_home), "remote", "rm", "up"]) == 0
    assert "up" not in json.loads((lanner_home / "models.json").read_text())


def test_urls_are_normalised_and_bad_ones_refused() -> None:
    assert normalise_url("http://h:8000") == "http://h:8000/v1"
    assert normalise_url("https://api.example.com/v1/") == "https://api.example.com/v1"
    with pytest.raises(LannerError, match="not an http"):
        normalise_url("ftp://h")


def test_chat_streams_through_the_servers_own_template(upstream: LiveServer,
                                                       lanner_home: Path) -> None:
    add(lanner_home, "up", upstream.url, "--model", "fake")
    model = Engine(lanner_home).load("up")
    assert model.backend.name == "remote"
    events = list(model.chat_stream(user("hello"), max_tokens=100))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) > 1  # streamed, not one block
    result = collect(iter(events))
    assert result.text == "you said: olleh"
    assert result.finish is not None and result.finish.reason == "stop"
    # Usage is the server's: the fake counts one token a character.
    assert result.finish.usage.completion_tokens == len("you said: olleh")
    assert result.finish.usage.prompt_tokens > len("hello")


def test_raw_completion_stop_strings_and_length(upstream: LiveServer, lanner_home: Path) -> None:
    add(lanner_home, "up", upstream.url, "--model", "fake")
    model = Engine(lanner_home).load("up")
    # More stop strings than OpenAI's 4: the fifth is enforced here.
    stop = ["#1", "#2", "#3", "#4", "said"]
    text = model.generate("hi", raw=True, stop=stop, max_tokens=50)
    assert text == "you "
    finish = collect(model.stream("hi", raw=True, max_tokens=3)).finish
    assert finish is not None and finish.reason == "length"


def test_session_log_and_priced_usage_ledger(upstream: LiveServer, lanner_home: Path) -> None:
    add(lanner_home, "up", upstream.url, "--model", "fake")
    (lanner_home / "prices.toml").write_text('["up"]\ninput = 2.0\noutput = 10.0\n')
    model = Engine(lanner_home).load("up")
    store = Store(lanner_home / "logs.db")
    session = ChatSession(model, store)
    answer = "".join(e.text for e in session.send("abc", max_tokens=50)
                     if isinstance(e, TextDelta))
    assert answer == "you said: cba"
    turn = store.turns(conversation_id=session.conversation_id)[-1]
    assert turn.backend == "remote" and turn.backend_version == f"fake at {upstream.url}/v1"
    assert turn.completion_tokens == len(answer)
    line = ledger(lanner_home)[-1]
    assert line["remote"] == "up" and line["usage_from_server"] is True
    assert line["completion_tokens"] == len(answer)
    expected = (line["prompt_tokens"] * 2.0 + line["completion_tokens"] * 10.0) / 1e6
    assert line["cost"] == pytest.approx(expected) and line["currency"] == "USD"
    # The logged turn keeps the same cost, and `lanner logs` shows it.
    assert turn.cost == pytest.approx(expected) and turn.currency == "USD"
    assert format_usage(turn).endswith(f"cost {turn.cost:.6g} USD")


def test_a_bad_price_table_names_the_field(upstream: LiveServer, lanner_home: Path) -> None:
    add(lanner_home, "up", upstream.url, "--model", "fake")
    (lanner_home / "prices.toml").write_text('["up"]\ninput = 2.0\noutptu = 1.0\n')
    model = Engine(lanner_home).load("up")
    with pytest.raises(LannerError, match=r"prices.toml: \['up'\]: unknown field 'outptu'"):
        model.generate("hi", max_tokens=5)


def test_loglikelihood_through_echo_matches_the_local_model(
        upstream: LiveServer, lanner_home: Path) -> None:
    add(lanner_home, "tiny", upstream.url, "--model", "tinycoder")
    remote = Engine(lanner_home).load("tiny")
    local = Engine(lanner_home).load("tinycoder")
    for context, continuation in [("The cat sat on the", " mat"), ("def f(x):", " return x")]:
        got, _ = remote.backend.loglikelihood(context, continuation)
        want, _ = local.backend.loglikelihood(context, continuation)
        assert got == pytest.approx(want, abs=1e-3)
        assert got < 0


def test_multiple_choice_eval_through_a_remote_matches_local(
        upstream: LiveServer, lanner_home: Path) -> None:
    from lanner.evals import runner
    from lanner.evals.taskfile import load_task

    add(lanner_home, "tiny", upstream.url, "--model", "tinycoder")
    task = load_task(Path(__file__).parent / "data" / "evals" / "mc_tiny.yaml")
    remote = runner.evaluate(Engine(lanner_home).load("tiny"), task, limit=3)
    local = runner.evaluate(Engine(lanner_home).load("tinycoder"), task, limit=3)
    assert [i.scores for i in remote.items] == [i.scores for i in local.items]
    assert {k: m.value for k, m in remote.metrics.items()} == \
        {k: m.value for k, m in local.metrics.items()}


def test_serve_proxies_a_remote_engine(upstream: LiveServer, lanner_home: Path) -> None:
    add(lanner_home, "up", upstream.url, "--model", "fake")
    engine = Engine(lanner_home)
    with serving(create_app(engine, ["up"], embedder=None)) as proxy:
        answer = proxy.client().chat.completions.create(model="up", messages=user("proxy"))
    assert answer.choices[0].message.content == "you said: yxorp"
    engine.close()


def test_run_verb_uses_a_remote_engine(upstream: LiveServer, lanner_home: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    add(lanner_home, "up", upstream.url, "--model", "fake")
    assert main(["--home", str(lanner_home), "run", "up", "ok"]) == 0
    assert "you said: ko" in capsys.readouterr().out


def test_compare_puts_a_prompt_to_remotes(upstream: LiveServer, lanner_home: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    add(lanner_home, "a", upstream.url, "--model", "fake")
    add(lanner_home, "b", upstream.url, "--model", "fake")
    capsys.readouterr()
    assert main(["--home", str(lanner_home), "compare", "-m", "a", "-m", "b", "hello",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    texts = json.dumps(out)
    assert texts.count("you said: olleh") == 2, out


# -- scripted edges -------------------------------------------------------------


def sse(*texts: str, done: bool = True) -> bytes:
    chunks = [{"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}
              for t in texts]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 7, "completion_tokens": len(texts)}})
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks)
    return (body + ("data: [DONE]\n\n" if done else "")).encode()


def scripted_backend(handler: Callable[[httpx.Request], httpx.Response], home: Path,
                     **config: Any) -> tuple[RemoteBackend, list[float]]:
    """A RemoteBackend on an httpx MockTransport; sleeps are recorded, not slept."""
    waits: list[float] = []
    backend = RemoteBackend(RemoteConfig("scripted", "http://scripted/v1", "m", context=100,
                                         **config), home,
                            transport=httpx.MockTransport(handler),
                            retry=Retry(attempts=4, base_s=0.01, max_wait_s=30))
    backend._client._sleep = waits.append  # type: ignore[attr-defined]
    return backend, waits


def chat_request(backend: RemoteBackend) -> Request:
    from lanner.backends.remote import CHAT_MARK

    text = CHAT_MARK + json.dumps(user("hi"))
    return Request(backend.tokenize(text), max_tokens=10)


def test_429_with_retry_after_is_retried(lanner_home: Path) -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "3"},
                                  json={"error": {"message": "slow down"}})
        if len(calls) == 2:
            return httpx.Response(503, json={"error": {"message": "warming up"}})
        return httpx.Response(200, content=sse("ok", "!"),
                              headers={"content-type": "text/event-stream"})

    backend, waits = scripted_backend(handler, lanner_home)
    result = collect(backend.stream(chat_request(backend)))
    assert result.text == "ok!" and len(calls) == 3
    assert waits[0] == 3.0  # the server's Retry-After, honoured exactly
    assert 0 < waits[1] <= 0.02  # then exponential back-off from base_s
    assert result.finish is not None and result.finish.usage.prompt_tokens == 7


def test_retry_is_bounded(lanner_home: Path) -> None:
    def always_503(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {"message": "down"}})

    backend, waits = scripted_backend(always_503, lanner_home)
    with pytest.raises(Overloaded, match=r"answered 503 \(after 4 tries\): down"):
        collect(backend.stream(chat_request(backend)))
    assert len(waits) == 3

    def long_wait(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "3600"})

    backend, waits = scripted_backend(long_wait, lanner_home)
    with pytest.raises(Overloaded, match="asks to wait 3600 s") as info:
        collect(backend.stream(chat_request(backend)))
    assert waits == [] and info.value.retry_after == 3600


def test_retry_after_as_an_http_date() -> None:
    from datetime import datetime, timezone

    now = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert retry_after_s("Tue, 01 Dec 2026 12:00:05 GMT", now) == 5.0
    assert retry_after_s("soon", now) is None


def test_a_stream_without_done_is_an_error(lanner_home: Path) -> None:
    backend, _ = scripted_backend(
        lambda r: httpx.Response(200, content=sse("par", "tial", done=False)), lanner_home)
    with pytest.raises(RemoteError, match="ended without \\[DONE\\]"):
        collect(backend.stream(chat_request(backend)))


def test_chat_only_server_cannot_score(lanner_home: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"message": "no such route"}})

    backend, _ = scripted_backend(handler, lanner_home)
    with pytest.raises(NotSupported, match="cannot score loglikelihoods: it refused echo"):
        backend.loglikelihood("a", " b")
    with pytest.raises(NotSupported, match="no such route. A raw prompt needs /v1/completions"):
        collect(backend.stream(Request(backend.tokenize("raw"), max_tokens=5)))


class BrokenServer:
    """A raw HTTP server that starts an SSE answer, sends one chunk, then
    closes the connection (``stall=False``) or goes silent (``stall=True``)."""

    def __init__(self, stall: bool) -> None:
        self.stall = stall
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.release = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        conn.recv(65536)
        chunk = b'data: {"choices": [{"index": 0, "delta": {"content": "half"}}]}\n\n'
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n"
                     + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        if self.stall:
            self.release.wait(30)
        conn.close()

    def close(self) -> None:
        self.release.set()
        self.sock.close()


@pytest.mark.parametrize("stall", [False, True], ids=["dropped", "stalled"])
def test_a_broken_stream_is_reported_not_hung(lanner_home: Path, stall: bool) -> None:
    server = BrokenServer(stall)
    try:
        backend = RemoteBackend(RemoteConfig("flaky", server.url, "m", context=100,
                                             timeout_s=1.0), lanner_home)
        seen: list[str] = []
        start = time.monotonic()
        with pytest.raises(RemoteError, match="mid-stream.*incomplete"):
            for event in backend.stream(chat_request(backend)):
                if isinstance(event, TextDelta):
                    seen.append(event.text)
        assert time.monotonic() - start < 10
        assert "".join(seen) == "half"  # what came before the break was delivered
    finally:
        server.close()
    line = ledger(lanner_home)[-1]
    assert line["remote"] == "flaky" and line["finish"] == "cancelled"


def test_characters_are_the_token_ids(lanner_home: Path) -> None:
    backend, _ = scripted_backend(lambda r: httpx.Response(500), lanner_home)
    ids = backend.tokenize("héllo ✓")
    assert backend.detokenize(ids) == "héllo ✓"
    assert backend.n_ctx == 100 * CHARS_PER_TOKEN
    with pytest.raises(LannerError, match="token id 55296 is not a character"):
        backend.detokenize([0xD800])
    assert math.isfinite(backend.n_ctx)


def test_models_fit_and_info_know_a_remote(lanner_home: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    home = ["--home", str(lanner_home)]
    add(lanner_home, "falcon", "http://127.0.0.1:9", "--no-check",
        "--model", "tiiuae/falcon-7b-instruct")
    add(lanner_home, "odd", "http://127.0.0.1:9", "--no-check", "--model", "m")
    capsys.readouterr()
    assert main([*home, "models"]) == 0
    assert "tiiuae/falcon-7b-instruct at http://127.0.0.1:9/v1" in capsys.readouterr().out
    # Planned as the catalog entry of the model it serves.
    assert main([*home, "fit", "falcon", "--gpu", "24GB"]) == 0
    assert "7.22B parameters" in capsys.readouterr().out
    assert main([*home, "info", "odd"]) == 1
    assert "odd is a remote engine serving 'm', which the catalog does not know" in \
        capsys.readouterr().err


def test_echo_text_offsets_point_into_the_prompt_with_a_sentencepiece_model(
        upstream: LiveServer) -> None:
    """tinycoder's first piece spells SentencePiece's leading space, which the
    prompt lacks: every offset still points at its token's text."""
    prompt = "Hello world, the quick brown fox"
    for stream in (False, True):
        reply = upstream.client().completions.create(
            model="tinycoder", prompt=prompt, echo=True, logprobs=1, max_tokens=1,
            temperature=0, stream=stream)
        chunks = list(reply) if stream else [reply]
        lp = chunks[0].choices[0].logprobs
        assert lp is not None and lp.tokens and lp.text_offset
        assert lp.tokens[0].startswith(" ") and lp.text_offset[0] == 0
        echoed = [(t, o) for t, o in zip(lp.tokens, lp.text_offset, strict=True)
                  if o < len(prompt)]
        assert len(echoed) >= 5
        for token, offset in echoed[1:]:
            assert prompt[offset:offset + len(token)] == token, (token, offset)

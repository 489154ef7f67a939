"""The OpenAI-compatible server driven by the official ``openai`` client over
real HTTP: the scripted fake backend for exact edges, the bundled SmolLM2
(llama.cpp) and MiniLM for the end-to-end paths."""

from __future__ import annotations

import base64
import json
import math
import struct
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from lanner.backends.fake import FakeBackend
from lanner.engine.chatformat import resolve_chat_format
from lanner.engine.engine import Engine
from lanner.engine.model import Model
from lanner.engine.registry import ModelSpec
from lanner.engine.types import Event, Request
from lanner.errors import InvalidRequest
from lanner.server.app import create_app
from serverkit import LiveServer, serving, user

DEFAULT_REPLY = "Hello from the fake model."


def scripted(prompt: str) -> str:
    """The fake's reply: the text after ``say:`` up to the end of the turn;
    ``[EOT]`` stands for the end-of-turn marker itself."""
    if "say:" not in prompt:
        return DEFAULT_REPLY
    return prompt.split("say:", 1)[1].split("<|im_end|>", 1)[0].replace("[EOT]", "<|im_end|>")


class TrackingBackend(FakeBackend):
    """Counts streams opened and closed (a closed stream freed its batch slot)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened = 0
        self.finished = 0
        self.tokens_out = 0

    def stream(self, request: Request) -> Generator[Event, None, None]:
        inner = super().stream(request)

        def tracked() -> Generator[Event, None, None]:
            self.opened += 1
            try:
                for event in inner:
                    self.tokens_out += 1
                    yield event
            finally:
                inner.close()
                self.finished += 1

        return tracked()


class BrokenBackend(FakeBackend):
    """``early`` in the prompt: rejects the request before any event;
    otherwise breaks after one delta."""

    def stream(self, request: Request) -> Generator[Event, None, None]:
        if "early" in self.detokenize([int(i) for i in request.prompt]):
            raise InvalidRequest("temperature", "this backend rejects it")
        inner = super().stream(request)

        def broken() -> Generator[Event, None, None]:
            yield next(inner)
            raise RuntimeError("the backend fell over")

        return broken()


class FakeEmbedder:
    """Vectors from letter counts: exact and predictable."""

    name = "all-MiniLM-L6-v2"
    dimensions = 3

    def accepts(self, model: str) -> bool:
        return model == self.name

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        vectors = []
        for text in texts:
            v = [text.count("a") + 1.0, text.count("b"), len(text)]
            norm = math.sqrt(sum(x * x for x in v))
            vectors.append([x / norm for x in v])
        return vectors, sum(len(t) + 2 for t in texts)


class LazyEngine(Engine):
    """Loads fake models by name, counting loads (for keep-alive tests)."""

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.loads = 0
        self.backends: list[FakeBackend] = []

    def load(self, name: str = "", **options: Any) -> Model:  # type: ignore[override]
        self.loads += 1
        backend = FakeBackend(scripted)
        self.backends.append(backend)
        model = Model(ModelSpec(name, Path(name), "fake"), backend)
        self._models[(name, self.loads)] = model
        return model


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FakeBackend]:
    return {"fake": TrackingBackend(scripted), "slow": TrackingBackend(scripted, delay_s=0.02),
            "broken": BrokenBackend(scripted)}


@pytest.fixture(scope="module")
def fake_server(
    tmp_path_factory: pytest.TempPathFactory, fakes: dict[str, FakeBackend],
) -> Iterator[LiveServer]:
    engine = Engine(tmp_path_factory.mktemp("home"))
    for name, backend in fakes.items():
        engine.attach(name, backend)
    app = create_app(engine, list(fakes), embedder=FakeEmbedder(), max_queue=32)
    with serving(app) as server:
        yield server


@pytest.fixture
def client(fake_server: LiveServer) -> openai.OpenAI:
    return fake_server.client()



def sse_events(response: httpx.Response) -> list[Any]:
    """Every ``data:`` payload of an SSE response, JSON-decoded ([DONE] kept as is)."""
    out: list[Any] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# -- the fake backend: exact edges ---------------------------------------------


def test_models_lists_served_models_and_the_embedder(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["fake", "slow", "broken", "all-MiniLM-L6-v2"]
    assert client.models.retrieve("fake").owned_by == "lanner"


def test_chat_answer_and_exact_usage(
    client: openai.OpenAI, fakes: dict[str, FakeBackend],
) -> None:
    messages: list[Any] = [{"role": "system", "content": "Be brief."},
                {"role": "assistant", "content": "Hi."},
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
                {"role": "developer", "content": "Really brief."},
                {"role": "user", "content": "say:Bonjour à tous"}]
    reply = client.chat.completions.create(model="fake", messages=messages)
    assert reply.object == "chat.completion"
    assert reply.model == "fake"
    assert reply.choices[0].message.content == "Bonjour à tous"
    assert reply.choices[0].finish_reason == "stop"
    # Exactly the tokens of the rendered template (developer became system).
    fake = fakes["fake"]
    as_sent = [{**m, "role": "system" if m["role"] == "developer" else m["role"]}
               for m in messages]
    rendered = resolve_chat_format(fake.metadata).render(as_sent)
    assert list(fake.requests[-1].prompt) == fake.tokenize(rendered, add_bos=False, special=True)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(fake.tokenize(rendered, add_bos=False, special=True))
    assert reply.usage.completion_tokens == len("Bonjour à tous")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + len("Bonjour à tous")


def test_chat_stream_role_chunks_usage_and_done(fake_server: LiveServer,
                                                client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fake", messages=user("say:streamed text"), stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "streamed text"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len("streamed text")
    # On the wire: SSE data lines ending with [DONE]; no usage chunk unless asked.
    raw = httpx.post(fake_server.url + "/v1/chat/completions", timeout=10,
                     json={"model": "fake", "messages": user("say:ab"), "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])


def test_stream_never_leaks_stop_strings_and_keeps_characters_whole(
    client: openai.OpenAI,
) -> None:
    # The end-of-turn marker (from the chat format) and a user stop string,
    # each preceded by text that starts like them.
    cases = [("say:a<b <|im x[EOT]hidden", [], "a<b <|im x"),
             ("say:Grüße 👋 ST STOP gone", ["STOP"], "Grüße 👋 ST ")]
    for prompt, stop, expected in cases:
        stream = client.chat.completions.create(model="fake", messages=user(prompt),
                                                stream=True, stop=stop or None)
        deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(deltas) == expected
        assert not any("<|im_end" in d or "STOP" in d for d in deltas)
        if "👋" in expected:
            assert "👋" in deltas  # one character, one delta: never split
        whole = client.chat.completions.create(model="fake", messages=user(prompt),
                                               stop=stop or None)
        assert whole.choices[0].message.content == expected


def test_n_choices_each_get_their_own_seed(
    client: openai.OpenAI, fakes: dict[str, FakeBackend],
) -> None:
    reply = client.chat.completions.create(model="fake", messages=user("say:same"), n=3, seed=7)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.content == "same" for c in reply.choices)
    assert sorted(r.seed for r in fakes["fake"].requests[-3:]) == [7, 8, 9]  # type: ignore[type-var]
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 3 * len("same")
    assert reply.usage.prompt_tokens == len(fakes["fake"].requests[-1].prompt)  # counted once
    stream = client.chat.completions.create(model="fake", messages=user("say:xy"), n=2,
                                            stream=True)
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: "xy", 1: "xy"}


def test_sampling_fields_reach_the_backend(
    client: openai.OpenAI, fakes: dict[str, FakeBackend],
) -> None:
    client.chat.completions.create(
        model="fake", messages=user("say:x"), temperature=0.3, top_p=0.5, seed=11,
        presence_penalty=0.5, frequency_penalty=-0.5, max_completion_tokens=9, stop="END",
        user="someone", extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2})
    sent = fakes["fake"].requests[-1]
    assert (sent.temperature, sent.top_p, sent.seed, sent.max_tokens) == (0.3, 0.5, 11, 9)
    assert (sent.presence_penalty, sent.frequency_penalty) == (0.5, -0.5)
    assert (sent.top_k, sent.min_p, sent.repetition_penalty) == (5, 0.1, 1.2)
    assert "END" in sent.stop and "<|im_end|>" in sent.stop
    client.chat.completions.create(model="fake", messages=user("say:x"))
    assert fakes["fake"].requests[-1].max_tokens is None  # OpenAI: up to the context


def test_logprobs_in_openai_shape(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="fake", messages=user("say:hé"),
                                           logprobs=True, top_logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [t.token for t in logprobs.content] == ["h", "é"]
    assert logprobs.content[1].bytes == list("é".encode())
    assert logprobs.content[0].logprob == pytest.approx(math.log(0.9))
    assert [len(t.top_logprobs) for t in logprobs.content] == [2, 2]
    plain = client.chat.completions.create(model="fake", messages=user("say:hé"))
    assert plain.choices[0].logprobs is None


def test_max_tokens_cuts_with_finish_reason_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="fake", messages=user("say:abcdef"),
                                           max_tokens=3)
    assert reply.choices[0].message.content == "abc"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 3


def test_completions_echo_with_prompt_logprobs(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="fake", prompt="say:xyz", echo=True, logprobs=1,
                                      max_tokens=2)
    choice = reply.choices[0]
    assert choice.text == "say:xyz" + "xy"
    assert choice.finish_reason == "length"
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == list(range(len(choice.text)))
    assert lp.token_logprobs[0] is None  # the first prompt token has no context
    assert all(v == pytest.approx(math.log(0.9)) for v in lp.token_logprobs[1:])
    assert lp.top_logprobs is not None and lp.top_logprobs[-1] == {"y": pytest.approx(
        math.log(0.9))}
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (8, 2)  # BOS + 7


def test_completions_default_max_tokens_batch_prompts_and_stream(client: openai.OpenAI) -> None:
    long = "say:" + "z" * 40
    assert client.completions.create(model="fake", prompt=long).choices[0].text == "z" * 16
    reply = client.completions.create(model="fake", prompt=["say:one", "say:two"], n=2)
    assert [(c.index, c.text) for c in reply.choices] == [
        (0, "one"), (1, "one"), (2, "two"), (3, "two")]
    stream = client.completions.create(model="fake", prompt="say:flow", stream=True,
                                       echo=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "say:flowflow"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_client_leaving_mid_stream_closes_the_backend_stream(
    fake_server: LiveServer, fakes: dict[str, FakeBackend],
) -> None:
    slow = fakes["slow"]
    assert isinstance(slow, TrackingBackend)
    before = slow.finished
    body = {"model": "slow", "messages": user("say:" + "x" * 300), "stream": True}
    with httpx.Client(timeout=10) as http, \
            http.stream("POST", fake_server.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    left = time.monotonic()
    assert wait_for(lambda: slow.finished == before + 1, timeout=3)
    assert time.monotonic() - left < 1.0  # 300 tokens would take 6 s
    assert slow.tokens_out < 100
    pool = fake_server.app.state.lanner.pool
    assert wait_for(lambda: pool.in_flight == 0)


def test_client_leaving_before_a_whole_answer_stops_generation(
    fake_server: LiveServer, fakes: dict[str, FakeBackend],
) -> None:
    slow = fakes["slow"]
    assert isinstance(slow, TrackingBackend)
    before_tokens, before = slow.tokens_out, slow.finished
    body = {"model": "slow", "messages": user("say:" + "y" * 300)}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(fake_server.url + "/v1/chat/completions", json=body, timeout=0.3)
    assert wait_for(lambda: slow.finished == before + 1, timeout=3)
    assert slow.tokens_out - before_tokens < 150


def test_backend_errors_are_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="broken", messages=user("early"))
    assert info.value.body["param"] == "temperature"  # type: ignore[index]
    # Mid-stream the status is already 200: the error arrives as an SSE event.
    with pytest.raises(openai.APIError, match="internal server error"):
        list(client.chat.completions.create(model="broken", messages=user("say:abc"),
                                            stream=True))
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="broken", messages=user("say:abc"))


def test_embeddings_float_and_base64(client: openai.OpenAI, fake_server: LiveServer) -> None:
    result = client.embeddings.create(model="all-MiniLM-L6-v2", input=["aab", "b"])
    assert [d.index for d in result.data] == [0, 1]
    first = result.data[0].embedding
    assert first == pytest.approx(FakeEmbedder().embed(["aab"])[0][0], abs=1e-6)
    assert result.usage.prompt_tokens == (3 + 2) + (1 + 2)
    raw = httpx.post(fake_server.url + "/v1/embeddings", json={
        "model": "all-MiniLM-L6-v2", "input": "aab", "encoding_format": "float"}).json()
    packed = httpx.post(fake_server.url + "/v1/embeddings", json={
        "model": "all-MiniLM-L6-v2", "input": "aab", "encoding_format": "base64"}).json()
    decoded = struct.unpack("<3f", base64.b64decode(packed["data"][0]["embedding"]))
    assert decoded == pytest.approx(raw["data"][0]["embedding"], abs=1e-6)


def test_health_metrics_and_openapi(fake_server: LiveServer, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="fake", messages=user("say:m"))
    health = httpx.get(fake_server.url + "/health").json()
    assert health["status"] == "ok" and health["models"]["fake"] == "loaded"
    assert health["in_flight"] == 0
    text = httpx.get(fake_server.url + "/metrics").text
    assert 'lanner_requests_total{method="POST",path="/v1/chat/completions",status="200"}' in text
    ttft = [line for line in text.splitlines()
            if line.startswith('lanner_time_to_first_token_seconds_count{model="fake"}')]
    assert ttft and int(ttft[0].split()[-1]) >= 1
    assert "lanner_queue_depth 0" in text
    assert 'lanner_completion_tokens_total{model="fake"}' in text
    schema = httpx.get(fake_server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
            "/v1/models"} <= set(schema["paths"])
    assert "422" not in json.dumps(schema["paths"])


def test_idle_models_unload_after_keep_alive_and_reload(tmp_path: Path) -> None:
    engine = LazyEngine(tmp_path)
    app = create_app(engine, ["lazy"], keep_alive_s=0.3, embedder=None)
    with serving(app) as server:
        c = server.client()
        assert httpx.get(server.url + "/health").json()["models"] == {"lazy": "unloaded"}
        assert c.chat.completions.create(model="lazy", messages=user("say:one"))
        assert engine.loads == 1
        assert httpx.get(server.url + "/health").json()["models"] == {"lazy": "loaded"}
        assert wait_for(lambda: engine.backends[0].closed, timeout=3)
        assert httpx.get(server.url + "/health").json()["models"] == {"lazy": "unloaded"}
        reply = c.chat.completions.create(model="lazy", messages=user("say:two"))
        assert reply.choices[0].message.content == "two"
        assert engine.loads == 2


def test_concurrent_requests_finish_and_free_their_slots(
    fake_server: LiveServer, client: openai.OpenAI,
) -> None:
    results: list[str] = []

    def ask(i: int) -> None:
        r = client.chat.completions.create(model="slow", messages=user(f"say:r{i}"))
        results.append(r.choices[0].message.content or "")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert sorted(results) == sorted(f"r{i}" for i in range(8))
    assert fake_server.app.state.lanner.pool.in_flight == 0



# -- the bundled models: end to end -------------------------------------------

# One llama.cpp thread: the test process's own client threads share the two
# cores, and llama.cpp's spinning worker threads slow down badly when
# oversubscribed.
REAL_OPTIONS = {"n_threads": 1}  # the unified KV cache; the load test serves a split one
QUESTION = user("What is the capital of France? Answer in one sentence.")


@pytest.fixture(scope="module")
def real_server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path,
) -> Iterator[LiveServer]:
    engine = Engine(tmp_path_factory.mktemp("home"))
    app = create_app(engine, ["smollm2"], load_options=REAL_OPTIONS)
    with serving(app) as server:
        yield server
    engine.close()


@pytest.fixture
def real(real_server: LiveServer) -> openai.OpenAI:
    return real_server.client(timeout=120)


def served_model(server: LiveServer) -> Model:
    model: Model | None = server.app.state.lanner.pool.entry("smollm2").model
    assert model is not None
    return model


def test_real_models_endpoint(real: openai.OpenAI) -> None:
    assert [m.id for m in real.models.list()] == ["smollm2", "all-MiniLM-L6-v2"]


def test_real_chat_whole_and_streamed_agree_with_exact_usage(
    real: openai.OpenAI, real_server: LiveServer,
) -> None:
    whole = real.chat.completions.create(model="smollm2", messages=QUESTION,
                                         temperature=0, max_tokens=24)
    text = whole.choices[0].message.content
    assert text and "Paris" in text
    stream = real.chat.completions.create(model="smollm2", messages=QUESTION,
                                          temperature=0, max_tokens=24, stream=True,
                                          stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    model = served_model(real_server)
    prompt = model.chat_request(list(map(dict, QUESTION)), max_tokens=24).prompt
    for usage in (whole.usage, chunks[-1].usage):
        assert usage is not None
        assert usage.prompt_tokens == len(prompt)
        assert 0 < usage.completion_tokens <= 24
    assert whole.usage is not None
    if whole.choices[0].finish_reason == "length":
        assert whole.usage.completion_tokens == 24


def test_real_seed_reproduces_and_n2_gives_two_choices(real: openai.OpenAI) -> None:
    poem = user("Write a short poem about the sea.")

    def ask(n: int) -> list[str]:
        reply = real.chat.completions.create(model="smollm2", messages=poem,
                                             n=n, seed=1234, temperature=1.0, max_tokens=16)
        assert [c.index for c in reply.choices] == list(range(n))
        assert reply.usage is not None and reply.usage.completion_tokens > n
        return [c.message.content or "" for c in reply.choices]

    # A request alone in the batch reproduces exactly. (Streams that share a
    # batch may not: llama.cpp's batched arithmetic depends on the batch.)
    first = ask(1)
    assert first[0] and ask(1) == first
    assert all(ask(2))


def test_real_stop_string_cuts_and_never_leaks(real: openai.OpenAI) -> None:
    full = real.chat.completions.create(model="smollm2", messages=QUESTION,
                                        temperature=0, max_tokens=24)
    text = full.choices[0].message.content or ""
    stop = "Paris"
    assert stop in text
    expected = text[:text.index(stop)]
    cut = real.chat.completions.create(model="smollm2", messages=QUESTION,
                                       temperature=0, max_tokens=24, stop=[stop])
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    deltas = [c.choices[0].delta.content or "" for c in real.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=24,
        stop=[stop], stream=True) if c.choices]
    assert "".join(deltas) == expected  # not even a part of "Paris" leaked


def test_real_logprobs_are_consistent(real: openai.OpenAI) -> None:
    reply = real.chat.completions.create(model="smollm2", messages=QUESTION,
                                         temperature=0, max_tokens=8, logprobs=True,
                                         top_logprobs=3)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content) == reply.usage.completion_tokens  # type: ignore[union-attr]
    for token in content:
        assert token.logprob <= 0
        assert len(token.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-4)
        assert sum(math.exp(t.logprob) for t in token.top_logprobs) <= 1 + 1e-4
    assert "".join(t.token for t in content) == reply.choices[0].message.content


def test_real_completion_echo_scores_the_prompt(
    real: openai.OpenAI, real_server: LiveServer,
) -> None:
    prompt = "The capital of France is"
    reply = real.completions.create(model="smollm2", prompt=prompt, echo=True, logprobs=2,
                                    max_tokens=4, temperature=0)
    choice = reply.choices[0]
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.text_offset
    assert lp.tokens[:5] == ["The", " capital", " of", " France", " is"]
    assert lp.token_logprobs[0] is None
    backend = served_model(real_server).backend
    expected = backend.loglikelihood("The capital of France", " is")[0]
    # loglikelihood may reuse the echo's cached prefix: another batch shape,
    # which rounds differently in the third decimal.
    assert lp.token_logprobs[4] == pytest.approx(expected, abs=5e-3)
    # Prompt tokens carry their alternatives too (lm-evaluation-harness reads
    # them to tell whether a continuation is the greedy one).
    assert lp.top_logprobs is not None and lp.top_logprobs[0] is None
    assert all(len(top) == 2 for top in lp.top_logprobs[1:5])
    assert max(lp.top_logprobs[4].values()) >= lp.token_logprobs[4]
    assert lp.text_offset[5] == len(prompt)  # generated text starts after the echo
    assert reply.usage is not None and reply.usage.prompt_tokens == 5


def test_real_embeddings_unit_vectors_and_exact_tokens(
    real: openai.OpenAI, real_server: LiveServer,
) -> None:
    texts = ["The cat sits on the mat.", "A kitten is resting on a rug.",
             "Quarterly revenue rose by four percent."]
    result = real.embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # base64 on the wire
    vectors = [d.embedding for d in result.data]
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert all(sum(x * x for x in v) == pytest.approx(1.0, abs=1e-4) for v in vectors)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2]) + 0.2
    from transformers import AutoTokenizer

    from lanner.rag.embed import bundled_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    assert result.usage.prompt_tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts)
    too_long = httpx.post(real_server.url + "/v1/embeddings", timeout=60, json={
        "model": "all-MiniLM-L6-v2", "input": ["ok", "word " * 400]})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["param"] == "input"
    assert "input[1]" in too_long.json()["error"]["message"]


def test_real_client_leaving_mid_stream_frees_its_slot_at_once(
    real: openai.OpenAI, real_server: LiveServer,
) -> None:
    real.models.list()
    real.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=1)  # loaded
    backend = served_model(real_server).backend
    body = {"model": "smollm2", "stream": True, "max_tokens": 2000, "seed": 1,
            "messages": user("Write a very long story about the sea.")}
    with httpx.Client(timeout=30) as http, \
            http.stream("POST", real_server.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert backend.active_sequences == 1  # type: ignore[attr-defined]
    left = time.monotonic()
    assert wait_for(lambda: backend.active_sequences == 0, timeout=3)  # type: ignore[attr-defined]
    assert time.monotonic() - left < 1.0
    pool = real_server.app.state.lanner.pool
    assert wait_for(lambda: pool.in_flight == 0 and pool.waiting == 0)
    # The server goes on: the next request is answered.
    reply = real.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4)
    assert reply.usage is not None and reply.usage.completion_tokens > 0

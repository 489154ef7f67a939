"""Bad input is always a 4xx in OpenAI's error shape, never a 5xx: a table of
hand-picked cases, the API key, and schemathesis fuzzing the server's own
OpenAPI schema (bounded)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from lanner.backends.fake import FakeBackend
from lanner.engine.engine import Engine
from lanner.server.app import create_app
from serverkit import LiveServer, serving

KEY = "s3cret-key"
CHAT = "/v1/chat/completions"
DONE_MSG = [{"role": "user", "content": "hi"}]


class TinyEmbedder:
    name = "all-MiniLM-L6-v2"
    dimensions = 2

    def accepts(self, model: str) -> bool:
        return model == self.name

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        return [[1 / math.sqrt(2)] * 2 for _ in texts], 3 * len(texts)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    engine = Engine(tmp_path_factory.mktemp("home"))
    engine.attach("fake", FakeBackend(["Fine."], n_ctx=512))
    app = create_app(engine, ["fake"], embedder=TinyEmbedder(), max_queue=8)
    with serving(app) as live:
        yield live


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "fake", "messages": DONE_MSG, **fields}


# (name, path, body: dict or raw bytes, status, param, text in the message)
CASES: list[tuple[str, str, Any, int, str | None, str]] = [
    ("malformed JSON", CHAT, b'{"model": "fake", ', 400, None, "not valid JSON"),
    ("empty body", CHAT, b"", 400, None, "JSON object"),
    ("array body", CHAT, b"[1, 2]", 400, None, "JSON object"),
    ("unknown field", CHAT, chat(temprature=0.5), 400, "temprature", "unrecognized"),
    ("missing model", CHAT, {"messages": DONE_MSG}, 400, "model", "required"),
    ("missing messages", CHAT, {"model": "fake"}, 400, "messages", "required"),
    ("empty messages", CHAT, chat(messages=[]), 400, "messages", "at least 1"),
    ("messages not a list", CHAT, chat(messages="hi"), 400, "messages", ""),
    ("unknown role", CHAT, chat(messages=[{"role": "bot", "content": "x"}]), 400,
     "messages[0].role", ""),
    ("content wrong type", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400,
     "messages[0].content", ""),
    ("image part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "messages[0].content",
     "only text"),
    ("temperature a string", CHAT, chat(temperature="hot"), 400, "temperature", "number"),
    ("temperature too high", CHAT, chat(temperature=2.5), 400, "temperature", ""),
    ("top_p zero", CHAT, chat(top_p=0), 400, "top_p", ""),
    ("max_tokens negative", CHAT, chat(max_tokens=-5), 400, "max_tokens", ""),
    ("max_tokens zero", CHAT, chat(max_tokens=0), 400, "max_tokens", ""),
    ("max_tokens a float", CHAT, chat(max_tokens=1.5), 400, "max_tokens", ""),
    ("max_tokens huge", CHAT, chat(max_tokens=10**9), 400, "messages", "1000000000"),
    ("both max fields", CHAT, chat(max_tokens=5, max_completion_tokens=6), 400,
     "max_completion_tokens", "not both"),
    ("n zero", CHAT, chat(n=0), 400, "n", ""),
    ("n over the queue", CHAT, chat(n=9), 400, "n", "queue limit of 8"),
    ("stream a string", CHAT, chat(stream="yes"), 400, "stream", ""),
    ("stream_options without stream", CHAT, chat(stream_options={"include_usage": True}),
     400, "stream_options", "stream"),
    ("negative seed", CHAT, chat(seed=-1), 400, "seed", ""),
    ("empty stop", CHAT, chat(stop=[""]), 400, "stop", ""),
    ("penalty out of range", CHAT, chat(presence_penalty=3), 400, "presence_penalty", ""),
    ("top_logprobs alone", CHAT, chat(top_logprobs=2), 400, "top_logprobs", "logprobs"),
    ("top_logprobs too many", CHAT, chat(logprobs=True, top_logprobs=21), 400,
     "top_logprobs", ""),
    ("top_k negative", CHAT, chat(top_k=-1), 400, "top_k", ""),
    ("bad tool name", CHAT, chat(tools=[{"type": "function", "function": {"name": "two words"}}]),
     400, "tools[0].function.name", "pattern"),
    ("logit_bias", CHAT, chat(logit_bias={"50256": -100}), 400, "logit_bias", ""),
    ("prompt over the context", CHAT, chat(messages=[{"role": "user", "content": "x" * 600}]),
     400, "messages", "context window"),
    ("unknown model", CHAT, chat(model="gpt-9"), 404, None, "gpt-9"),
    ("completion: missing prompt", "/v1/completions", {"model": "fake"}, 400, "prompt", ""),
    ("completion: prompt a number", "/v1/completions", {"model": "fake", "prompt": 5}, 400,
     "prompt", ""),
    ("completion: ids mixed with text", "/v1/completions", {"model": "fake",
                                                             "prompt": [1, "a"]}, 400,
     "prompt", "not a mix"),
    ("completion: logprobs 6", "/v1/completions", {"model": "fake", "prompt": "a",
                                                   "logprobs": 6}, 400, "logprobs", ""),
    ("completion: suffix", "/v1/completions", {"model": "fake", "prompt": "a", "suffix": "b"},
     400, "suffix", ""),
    ("completion: huge max_tokens", "/v1/completions", {"model": "fake", "prompt": "a",
                                                        "max_tokens": 10**6}, 400, "prompt",
     "context window of 512"),
    ("completion: unknown model", "/v1/completions", {"model": "x", "prompt": "a"}, 404,
     None, ""),
    ("embedding: empty list", "/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": []},
     400, "input", "empty"),
    ("embedding: empty string", "/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": ""},
     400, "input", "empty"),
    ("embedding: token ids", "/v1/embeddings", {"model": "all-MiniLM-L6-v2",
                                                "input": [[1, 2]]}, 400, "input", "text"),
    ("embedding: format", "/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": "a",
                                             "encoding_format": "hex"}, 400,
     "encoding_format", ""),
    ("embedding: dimensions", "/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": "a",
                                                 "dimensions": 5}, 400, "dimensions", ""),
    ("embedding: unknown model", "/v1/embeddings", {"model": "ada", "input": "a"}, 404, None,
     ""),
]


def assert_error_shape(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    return dict(error)


@pytest.mark.parametrize(("name", "path", "body", "status", "param", "text"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input_is_a_4xx_naming_the_field(
    server: LiveServer, name: str, path: str, body: Any, status: int, param: str | None,
    text: str,
) -> None:
    if isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body,
                       headers={"content-type": "application/json"}, timeout=10)
    else:
        r = httpx.post(server.url + path, json=body, timeout=10)
    error = assert_error_shape(r, status)
    assert error["param"] == param
    assert text in error["message"]


def test_context_error_gives_both_numbers_and_the_openai_code(server: LiveServer) -> None:
    r = httpx.post(server.url + CHAT, json=chat(max_tokens=600), timeout=10)
    error = assert_error_shape(r, 400)
    assert error["code"] == "context_length_exceeded"
    assert "max_tokens (600)" in error["message"] and "512 tokens" in error["message"]
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fake", messages=DONE_MSG,  # type: ignore[arg-type]
                                       max_tokens=600)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=DONE_MSG)  # type: ignore[arg-type]


def test_unknown_routes_and_methods(server: LiveServer) -> None:
    assert_error_shape(httpx.get(server.url + "/v1/nothing"), 404)
    assert_error_shape(httpx.get(server.url + CHAT), 405)
    assert_error_shape(httpx.get(server.url + "/v1/models/nope"), 404)


def test_api_key_is_required_and_checked(tmp_path: Any) -> None:
    engine = Engine(tmp_path)
    engine.attach("fake", FakeBackend(["Fine."]))
    app = create_app(engine, ["fake"], api_key=KEY, embedder=None)
    with serving(app) as live:
        missing = assert_error_shape(httpx.post(live.url + CHAT, json=chat()), 401)
        assert "missing API key" in missing["message"]
        assert missing["code"] == "invalid_api_key"
        # Auth comes first: a malformed body without the key is still a 401.
        assert_error_shape(httpx.post(live.url + CHAT, content=b"{"), 401)
        wrong = live.client(api_key=KEY + "x")
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = live.client(api_key=KEY)
        assert right.chat.completions.create(model="fake", messages=DONE_MSG)  # type: ignore[arg-type]
        assert httpx.get(live.url + "/health").status_code == 200  # open to load balancers


def test_fuzzing_the_openapi_schema_finds_no_server_error(server: LiveServer) -> None:
    """Schemathesis generates valid and invalid bodies for every operation in
    /openapi.json (model ids pinned to the served ones, so valid requests
    reach the backend); none may get a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    raw = httpx.get(server.url + "/openapi.json").json()
    schema = schemathesis.openapi.from_dict(_pin_models(raw))
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = st.one_of(
            operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE),
            operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE))

        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case: Any) -> None:
            response = case.call(base_url=server.url, timeout=20)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r}: {response.text}")

        check()
    assert failures == []


def _pin_models(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with ``model`` restricted to the ids this server serves, and
    without the fields accepted only at their neutral value (the table above
    covers them), so that more generated requests reach the backend."""
    pinned = copy.deepcopy(schema)
    ids = {"ChatCompletionRequest": "fake", "CompletionRequest": "fake",
           "EmbeddingRequest": "all-MiniLM-L6-v2"}
    for name, model_id in ids.items():
        pinned["components"]["schemas"][name]["properties"]["model"] = {"enum": [model_id]}
    chat = pinned["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for field in ("tools", "tool_choice", "response_format", "logit_bias"):
        chat.pop(field, None)
    return pinned

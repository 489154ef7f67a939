"""Token-id prompts on ``POST /v1/completions``, as OpenAI's API and vLLM take
them and lm-evaluation-harness sends them: ids used exactly as given, one choice
per prompt, echo with logprobs, the end-of-generation token listed last, and
bad ids a 400 naming ``prompt``. The scripted fake backend for exact edges, the
bundled SmolLM2 (llama.cpp) for the real paths."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from lanner.backends.fake import FakeBackend
from lanner.engine.engine import Engine
from lanner.engine.model import Model
from lanner.server.app import create_app
from serverkit import LiveServer, serving

COMPLETIONS = "/v1/completions"


def say(prompt: str) -> str:
    """The fake's reply: the text after ``say:``."""
    return prompt.split("say:", 1)[1] if "say:" in prompt else "ok"


@pytest.fixture(scope="module")
def fake() -> FakeBackend:
    return FakeBackend(say)


@pytest.fixture(scope="module")
def fake_server(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeBackend,
) -> Iterator[LiveServer]:
    engine = Engine(tmp_path_factory.mktemp("home"))
    engine.attach("fake", fake)
    with serving(create_app(engine, ["fake"], embedder=None)) as server:
        yield server


def ids(fake: FakeBackend, text: str) -> list[int]:
    return fake.tokenize(text, add_bos=False)


def error_of(response: httpx.Response) -> dict[str, Any]:
    """OpenAI's error object of a 400."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    return dict(body["error"])


# -- the fake backend: exact edges ---------------------------------------------


def test_token_ids_are_used_exactly_as_given(fake_server: LiveServer, fake: FakeBackend) -> None:
    client = fake_server.client()
    prompt = ids(fake, "say:ab")
    reply = client.completions.create(model="fake", prompt=prompt, max_tokens=5)
    assert reply.choices[0].text == "ab"
    assert list(fake.requests[-1].prompt) == prompt  # no BOS added
    assert reply.usage is not None and reply.usage.prompt_tokens == len(prompt)
    text = client.completions.create(model="fake", prompt="say:ab", max_tokens=5)
    assert text.usage is not None and text.usage.prompt_tokens == len(prompt) + 1  # BOS


def test_a_list_of_token_id_lists_gives_one_choice_per_prompt(
    fake_server: LiveServer, fake: FakeBackend,
) -> None:
    prompts = [ids(fake, "say:one"), ids(fake, "say:three")]
    reply = fake_server.client().completions.create(model="fake", prompt=prompts, n=2)
    assert [(c.index, c.text) for c in reply.choices] == [
        (0, "one"), (1, "one"), (2, "three"), (3, "three")]
    assert reply.usage is not None and reply.usage.prompt_tokens == sum(map(len, prompts))


def test_echo_with_logprobs_on_token_ids(fake_server: LiveServer, fake: FakeBackend) -> None:
    reply = fake_server.client().completions.create(
        model="fake", prompt=ids(fake, "say:xyz"), echo=True, logprobs=1, max_tokens=2)
    choice = reply.choices[0]
    assert choice.text == "say:xyz" + "xy"
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == list(range(len(choice.text)))
    assert lp.token_logprobs[0] is None  # the first id has no context, even without BOS
    assert all(v == pytest.approx(math.log(0.9)) for v in lp.token_logprobs[1:])


BAD_PROMPTS: list[tuple[str, Any, str]] = [
    ("empty list", [], "empty"),
    ("ids mixed with text", [1, "a"], "not a mix"),
    ("text mixed with ids", ["a", 1], "not a mix"),
    ("lists mixed with text", [[1, 2], "a"], "not a mix"),
    ("a negative id", [5, -1], "prompt[1] is -1"),
    ("a boolean id", [True], "prompt[0] is True"),
    ("a fractional id", [1.5], "prompt[0] is 1.5"),
    ("an id past int32", [2**31], "not a token id"),
    ("an empty id list", [[1], []], "prompt[1] is an empty list"),
    ("a negative id in a list", [[1], [2, -3]], "prompt[1][1] is -3"),
    ("a boolean id in a list", [[False]], "prompt[0][0] is False"),
    ("an object", {"ids": [1]}, "must be a string"),
    ("null", None, "must be a string"),
]


@pytest.mark.parametrize(("name", "prompt", "text"), BAD_PROMPTS, ids=[c[0] for c in BAD_PROMPTS])
def test_bad_prompts_are_a_400_naming_prompt(
    fake_server: LiveServer, name: str, prompt: Any, text: str,
) -> None:
    r = httpx.post(fake_server.url + COMPLETIONS, json={"model": "fake", "prompt": prompt},
                   timeout=10)
    error = error_of(r)
    assert error["param"] == "prompt"
    assert error["message"].startswith("prompt: ") and text in error["message"]


def test_bad_prompt_through_the_openai_client(fake_server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        fake_server.client().completions.create(model="fake", prompt=[3, -4])
    assert info.value.param == "prompt"


# -- the bundled SmolLM2 through llama.cpp --------------------------------------

# One thread: several test modules may run llama.cpp at once (see test_server_api).
REAL_OPTIONS = {"n_threads": 1}
FRANCE = "The capital of France is"
# A chat turn whose answer is finished: greedy decoding's next token is <|im_end|>.
ANSWERED = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\nThe capital of France is Paris.")


@pytest.fixture(scope="module")
def real_server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path,
) -> Iterator[LiveServer]:
    engine = Engine(tmp_path_factory.mktemp("home"))
    with serving(create_app(engine, ["smollm2"], embedder=None,
                            load_options=REAL_OPTIONS)) as server:
        yield server
    engine.close()


@pytest.fixture
def real(real_server: LiveServer) -> openai.OpenAI:
    return real_server.client(timeout=120)


def served(server: LiveServer) -> Model:
    server.client(timeout=120).completions.create(model="smollm2", prompt="a", max_tokens=1)
    model: Model | None = server.app.state.lanner.pool.entry("smollm2").model
    assert model is not None
    return model


def test_real_token_ids_give_the_text_prompts_completion(
    real: openai.OpenAI, real_server: LiveServer,
) -> None:
    prompt = served(real_server).backend.tokenize(FRANCE, add_bos=True)  # as text is sent
    from_text = real.completions.create(model="smollm2", prompt=FRANCE, max_tokens=8,
                                        temperature=0)
    from_ids = real.completions.create(model="smollm2", prompt=prompt, max_tokens=8,
                                       temperature=0)
    assert from_ids.choices[0].text == from_text.choices[0].text != ""
    assert from_ids.usage == from_text.usage


def test_real_list_of_token_id_lists_gives_each_prompts_completion(
    real: openai.OpenAI, real_server: LiveServer,
) -> None:
    backend = served(real_server).backend
    texts = [FRANCE, "Water boils at"]
    prompts = [backend.tokenize(t, add_bos=False) for t in texts]
    together = real.completions.create(model="smollm2", prompt=prompts, max_tokens=6,
                                       temperature=0)
    alone = [real.completions.create(model="smollm2", prompt=p, max_tokens=6, temperature=0)
             for p in prompts]
    assert [c.index for c in together.choices] == [0, 1]
    assert [c.text for c in together.choices] == [a.choices[0].text for a in alone]


def test_real_echo_logprobs_on_token_ids_equal_the_text_prompts(
    real: openai.OpenAI, real_server: LiveServer,
) -> None:
    backend = served(real_server).backend
    prompt = backend.tokenize(FRANCE, add_bos=False)
    assert prompt == backend.tokenize(FRANCE, add_bos=True)  # SmolLM2 adds no BOS
    by_text = real.completions.create(model="smollm2", prompt=FRANCE, echo=True, logprobs=2,
                                      max_tokens=1, temperature=0).choices[0]
    by_ids = real.completions.create(model="smollm2", prompt=prompt, echo=True, logprobs=2,
                                     max_tokens=1, temperature=0).choices[0]
    assert by_ids.text == by_text.text and by_ids.text.startswith(FRANCE)
    text_lp, ids_lp = by_text.logprobs, by_ids.logprobs
    assert text_lp is not None and ids_lp is not None and ids_lp.token_logprobs is not None
    assert ids_lp.tokens == text_lp.tokens
    assert len(ids_lp.token_logprobs) == len(prompt) + 1
    assert ids_lp.token_logprobs[0] is None
    assert all(isinstance(v, float) for v in ids_lp.token_logprobs[1:])
    # Both are one scoring pass over the same ids; llama.cpp may serve the
    # second from its cached prefix, a batch shape that rounds differently.
    assert ids_lp.token_logprobs[1:] == pytest.approx(text_lp.token_logprobs[1:], abs=5e-3)


def test_real_end_of_generation_token_is_listed_last_as_lm_eval_expects(
    real_server: LiveServer,
) -> None:
    """lm-evaluation-harness sends exactly this and sums ``token_logprobs[ctxlen:-1]``:
    the last entry must be the generated token even when it is the end token."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    backend = served(real_server).backend
    prompt = backend.tokenize(ANSWERED, add_bos=False, special=True)
    context = len(backend.tokenize(ANSWERED.removesuffix(" Paris."), add_bos=False,
                                   special=True))
    payload = {"model": "smollm2", "prompt": [prompt], "temperature": 0, "max_tokens": 1,
               "logprobs": 1, "seed": 1234, "echo": True}
    r = httpx.post(real_server.url + COMPLETIONS, json=payload, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "stop" and r.json()["usage"]["completion_tokens"] == 0
    assert len(lp["token_logprobs"]) == len(prompt) + 1
    end = lp["token_logprobs"][-1]
    assert end == max(lp["top_logprobs"][-1].values())  # greedy stopped on the likeliest
    [(total, greedy)] = LocalCompletionsAPI.parse_logprobs(r.json(), [prompt], [context])
    assert total == pytest.approx(sum(lp["token_logprobs"][context:len(prompt)]))
    assert greedy is True  # " Paris." is SmolLM2's own answer
    # Without echo, and streamed, the end token is the same last entry.
    alone = httpx.post(real_server.url + COMPLETIONS, timeout=120,
                       json={**payload, "echo": False}).json()["choices"][0]["logprobs"]
    assert alone["token_logprobs"] == [pytest.approx(end, abs=5e-3)]
    with httpx.stream("POST", real_server.url + COMPLETIONS, timeout=120,
                      json={**payload, "stream": True}) as streamed:
        chunks = [json.loads(line.removeprefix("data: ")) for line in streamed.iter_lines()
                  if line.startswith("data: {")]
    streamed_lps = [v for c in chunks if c["choices"][0]["logprobs"]
                    for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed_lps == [None, *map(pytest.approx, lp["token_logprobs"][1:])]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("fields", [{}, {"echo": True}, {"echo": True, "logprobs": 1},
                                    {"stream": True}],
                         ids=["plain", "echo", "echo+logprobs", "stream"])
def test_real_ids_outside_the_vocabulary_are_a_400_naming_prompt(
    real_server: LiveServer, fields: dict[str, Any],
) -> None:
    n_vocab = served(real_server).backend.metadata.extra["n_vocab"]
    assert isinstance(n_vocab, int)
    for bad in ([1, n_vocab], [[1, 2], [2**31 - 1]]):
        r = httpx.post(real_server.url + COMPLETIONS, timeout=60,
                       json={"model": "smollm2", "prompt": bad, "max_tokens": 2, **fields})
        error = error_of(r)
        assert error["param"] == "prompt" and "outside the vocabulary" in error["message"]
    ok = httpx.post(real_server.url + COMPLETIONS, timeout=60,
                    json={"model": "smollm2", "prompt": [1, n_vocab - 1], "max_tokens": 1})
    assert ok.status_code == 200  # the server is still up

"""Tools in ``/v1/chat/completions``, through the official ``openai`` client:
calls parsed out of scripted answers (the fake backend, Lanner's default
syntax), and forced calls constrained under the tool's schema (the bundled
SmolLM2 on llama.cpp)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessage, ChatCompletionMessageFunctionToolCall

from lanner.backends.fake import FakeBackend
from lanner.chat.toolcalls import syntax_named
from lanner.engine.engine import Engine
from lanner.server.app import create_app
from lanner.server.tool_calls import NO_PARAMETERS, forced_constraint
from serverkit import LiveServer, serving, user

CALL_SUMS = '<tool_call>\n{"name": "sums", "arguments": {"a": 1234, "b": 4321}}\n</tool_call>'
CALL_NOTE = '<tool_call>\n{"name": "note", "arguments": {"text": "buy milk"}}\n</tool_call>'
REPLIES = {"[add]": f"Let me add. {CALL_SUMS}", "[two]": f"{CALL_SUMS}\n{CALL_NOTE}",
           "[plain]": "No tool needed."}
RESULT_REPLY = "The sum is 5555."

SUMS_PARAMETERS = {"type": "object",
                   "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}
SUMS: Any = {"type": "function", "function": {
    "name": "sums", "description": "Add two whole numbers.", "parameters": SUMS_PARAMETERS}}
NOTE: Any = {"type": "function", "function": {
    "name": "note", "description": "Write a note.",
    "parameters": {"type": "object", "properties": {"text": {"type": "string"}},
                   "required": ["text"]}}}


# A template that knows tools (Qwen2.5's way), so the hermes syntax is native.
QWEN_LIKE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}\n{{ t | tojson }}"
    "{% endfor %}\n</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}"
    "{% endif %}{% for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name"
    " }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def scripted(prompt: str) -> str:
    """The fake's reply to the last message: a tool result gets the final
    answer; a ``[key]`` of REPLIES gets that reply."""
    last = prompt.rsplit("<|im_start|>", 2)[-2]
    if "<tool_response" in last:
        return RESULT_REPLY
    return next((reply for key, reply in REPLIES.items() if key in last), "Hello.")


@pytest.fixture(scope="module")
def fake() -> FakeBackend:
    return FakeBackend(scripted)


@pytest.fixture(scope="module")
def qwen_like() -> FakeBackend:
    return FakeBackend(scripted, chat_template=QWEN_LIKE)


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory, fake: FakeBackend,
                qwen_like: FakeBackend) -> Iterator[LiveServer]:
    engine = Engine(tmp_path_factory.mktemp("home"))
    engine.attach("fake", fake)
    engine.attach("qwen-like", qwen_like)
    with serving(create_app(engine, ["fake", "qwen-like"])) as server:
        yield server


@pytest.fixture
def client(fake_server: LiveServer) -> openai.OpenAI:
    return fake_server.client()



def last_prompt(fake: FakeBackend) -> str:
    return fake.detokenize([int(i) for i in fake.requests[-1].prompt])


def calls_of(message: ChatCompletionMessage) -> list[ChatCompletionMessageFunctionToolCall]:
    calls = message.tool_calls or []
    function_calls = [c for c in calls if isinstance(c, ChatCompletionMessageFunctionToolCall)]
    assert len(function_calls) == len(calls)
    return function_calls


# -- parsing scripted answers ----------------------------------------------------


def test_a_call_and_the_text_before_it(client: openai.OpenAI, fake: FakeBackend) -> None:
    reply = client.chat.completions.create(model="fake", messages=user("[add] 1234 + 4321?"),
                                           tools=[SUMS])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me add."
    [call] = calls_of(choice.message)
    assert call.type == "function" and len(call.id) == 9
    assert call.function.name == "sums"
    assert json.loads(call.function.arguments) == {"a": 1234, "b": 4321}
    # The tool was described to the model, in the default syntax's system prompt.
    prompt = last_prompt(fake)
    assert "<tools>" in prompt and '"name": "sums"' in prompt
    assert fake.requests[-1].constraint is None  # "auto" forces nothing


def test_streamed_call_in_openai_chunks(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="fake", messages=user("[add] 1234 + 4321?"),
                                            tools=[SUMS], stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert text.strip() == "Let me add." and "<tool_call>" not in text
    assert [(t.index, t.type, t.function and t.function.name) for t in calls] == \
        [(0, "function", "sums")]
    assert calls[0].id and calls[0].function is not None
    assert json.loads(calls[0].function.arguments or "") == \
        {"a": 1234, "b": 4321}
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"


def test_stream_helper_accumulates_the_calls(client: openai.OpenAI) -> None:
    strict: Any = {**SUMS, "function": {**SUMS["function"], "strict": True}}
    with client.chat.completions.stream(model="fake", messages=user("[add] 1234 + 4321?"),
                                        tools=[strict]) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert [(e.name, e.parsed_arguments) for e in done] == [("sums", {"a": 1234, "b": 4321})]
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert [c.function.parsed_arguments for c in message.tool_calls or []] == \
        [{"a": 1234, "b": 4321}]


def test_two_calls_in_one_turn(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="fake", messages=user("[two] do both"),
                                           tools=[SUMS, NOTE])
    calls = calls_of(reply.choices[0].message)
    assert reply.choices[0].message.content is None
    assert [c.function.name for c in calls] == ["sums", "note"]
    assert json.loads(calls[1].function.arguments) == {"text": "buy milk"}
    assert calls[0].id != calls[1].id
    stream = client.chat.completions.create(model="fake", messages=user("[two] do both"),
                                            tools=[SUMS, NOTE], stream=True)
    streamed = [t for c in stream if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert [(t.index, t.function and t.function.name) for t in streamed] == \
        [(0, "sums"), (1, "note")]


def test_streamed_logprobs_cover_every_token_once(client: openai.OpenAI) -> None:
    # The parser holds call text back; its tokens ride on the next chunk sent.
    stream = client.chat.completions.create(model="fake", messages=user("[add] 1234 + 4321?"),
                                            tools=[SUMS], stream=True, logprobs=True)
    tokens = [t.token for c in stream if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content or []]
    assert "".join(tokens) == REPLIES["[add]"]


def test_parallel_tool_calls_false_keeps_the_first(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="fake", messages=user("[two] do both"),
                                           tools=[SUMS, NOTE], parallel_tool_calls=False)
    assert [c.function.name for c in calls_of(reply.choices[0].message)] == ["sums"]


def test_follow_up_with_the_call_and_its_result(client: openai.OpenAI,
                                                fake: FakeBackend) -> None:
    messages = user("[add] 1234 + 4321?")
    first = client.chat.completions.create(model="fake", messages=messages, tools=[SUMS])
    call = calls_of(first.choices[0].message)[0]
    # The response message goes back as is (with its None fields), as clients do.
    messages += [first.choices[0].message,
                 {"role": "tool", "tool_call_id": call.id, "content": "5555"}]
    reply = client.chat.completions.create(model="fake", messages=messages, tools=[SUMS])
    assert reply.choices[0].message.content == RESULT_REPLY
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"
    prompt = last_prompt(fake)
    assert f"Let me add.\n{CALL_SUMS}<|im_end|>" in prompt  # the call, in the syntax
    assert '<tool_response name="sums">\n5555\n</tool_response>' in prompt


def test_a_template_that_knows_tools_renders_them_itself(
    client: openai.OpenAI, qwen_like: FakeBackend,
) -> None:
    messages = user("[add] 1234 + 4321?")
    first = client.chat.completions.create(model="qwen-like", messages=messages, tools=[SUMS])
    call = calls_of(first.choices[0].message)[0]
    assert call.function.name == "sums"
    prompt = last_prompt(qwen_like)
    assert prompt.startswith(f"<|im_start|>system\n<tools>{json.dumps(SUMS)}</tools>")
    messages += [first.choices[0].message,
                 {"role": "tool", "tool_call_id": call.id, "content": "5555"}]
    client.chat.completions.create(model="qwen-like", messages=messages, tools=[SUMS])
    prompt = last_prompt(qwen_like)
    # The template got the arguments as an object and wrote the call its own way.
    assert '"arguments": {"a": 1234, "b": 4321}}\n</tool_call><|im_end|>' in prompt
    assert "<|im_start|>tool\n5555<|im_end|>" in prompt


@pytest.mark.parametrize("name", ["lanner", "hermes", "llama3", "mistral"])
def test_the_forced_call_shape_is_what_the_syntax_parses(name: str) -> None:
    syntax = syntax_named(name)
    before, between, after = syntax.forced_call
    content, calls = syntax.parse(f'{before}"sums"{between}{{"a": 1, "b": 2}}{after}')
    assert content == ""
    assert [(c.name, c.arguments_dict()) for c in calls] == [("sums", {"a": 1, "b": 2})]
    grammar = forced_constraint(syntax, [SUMS, {"type": "function", "function": {
        "name": "ping", "parameters": NO_PARAMETERS}}]).source
    assert grammar.count("%json") == 2 and json.dumps(before) in grammar


def test_tool_choice_none_offers_nothing(client: openai.OpenAI, fake: FakeBackend) -> None:
    reply = client.chat.completions.create(model="fake", messages=user("[add] 1234 + 4321?"),
                                           tools=[SUMS], tool_choice="none")
    assert "<tools>" not in last_prompt(fake)
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content == REPLIES["[add]"]
    assert reply.choices[0].finish_reason == "stop"


def test_no_tools_leaves_call_markup_as_text(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="fake", messages=user("[add] 1234 + 4321?"))
    assert reply.choices[0].message.content == REPLIES["[add]"]
    assert reply.choices[0].message.tool_calls is None


def test_forced_choices_set_a_grammar_over_the_allowed_tools(
    client: openai.OpenAI, fake: FakeBackend,
) -> None:
    client.chat.completions.create(model="fake", messages=user("[add] go"), tools=[SUMS, NOTE],
                                   tool_choice={"type": "function", "function": {"name": "note"}})
    named = fake.requests[-1].constraint
    assert named is not None and named.kind == "lark"
    assert '"note' in named.source and '"sums' not in named.source
    client.chat.completions.create(model="fake", messages=user("[add] go"), tools=[SUMS, NOTE],
                                   tool_choice="required")
    required = fake.requests[-1].constraint
    assert required is not None and '"note' in required.source and '"sums' in required.source


@pytest.mark.parametrize(("change", "param"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": [{**SUMS, "function": {**SUMS["function"], "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{**SUMS, "function": {**SUMS["function"], "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{**SUMS, "function": {**SUMS["function"], "name": "two words"}}]},
     "tools[0].function.name"),
    ({"tools": [SUMS, {"type": "retrieval"}]}, "tools[1].type"),
    ({"tools": [SUMS, SUMS]}, "tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tools_are_400_naming_the_field(client: openai.OpenAI, change: dict[str, Any],
                                            param: str) -> None:
    body = {"model": "fake", "messages": user("[add] hi"), "tools": [SUMS], **change}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**body)
    assert err.value.status_code == 400
    assert isinstance(err.value.body, dict) and err.value.body.get("param") == param


# -- forced calls from the bundled model -------------------------------------------

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20},
                   "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast for a city.",
    "parameters": WEATHER_PARAMETERS}}
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "sums": SUMS_PARAMETERS}
ASK = user("What will the weather be in Paris for the next three days?")


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path,
         ) -> Iterator[openai.OpenAI]:
    engine = Engine(tmp_path_factory.mktemp("home"))
    # One llama.cpp thread: the client threads share the two cores (see test_server_api).
    app = create_app(engine, ["smollm2"], load_options={"n_threads": 1})
    with serving(app) as server:
        yield server.client(timeout=120)
    engine.close()


def assert_valid_call(name: str | None, arguments: str | None, allowed: set[str]) -> None:
    assert name in allowed
    jsonschema.validate(json.loads(arguments or ""), PARAMETERS[name])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_named_tool_choice_gives_a_valid_call(real: openai.OpenAI, seed: int) -> None:
    reply = real.chat.completions.create(
        model="smollm2", messages=ASK, tools=[SUMS, WEATHER], seed=seed, temperature=1.0,
        max_tokens=80, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = calls_of(choice.message)
    assert_valid_call(call.function.name, call.function.arguments, {"get_weather"})


@pytest.mark.parametrize("seed", [4, 5])
def test_named_tool_choice_streamed(real: openai.OpenAI, seed: int) -> None:
    stream = real.chat.completions.create(
        model="smollm2", messages=ASK, tools=[SUMS, WEATHER], seed=seed, temperature=1.0,
        max_tokens=80, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    chunks = [c for c in stream if c.choices]
    calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert len(calls) == 1 and calls[0].function is not None
    assert_valid_call(calls[0].function.name, calls[0].function.arguments, {"get_weather"})
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("seed", [6, 7])
def test_required_calls_one_of_the_tools(real: openai.OpenAI, seed: int) -> None:
    reply = real.chat.completions.create(
        model="smollm2", messages=user("Add 12 and 30, or tell me the weather in Rome."),
        tools=[SUMS, WEATHER], tool_choice="required", seed=seed, temperature=1.0,
        max_tokens=80)
    [call] = calls_of(reply.choices[0].message)
    assert_valid_call(call.function.name, call.function.arguments, {"sums", "get_weather"})
    assert reply.choices[0].finish_reason == "tool_calls"

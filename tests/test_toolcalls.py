"""Tool-call syntaxes: detection by template, whole-text and streaming extraction,
prompt rendering with tools."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from lanner.backends.base import ModelMetadata
from lanner.chat.metadata import read_metadata
from lanner.chat.toolcalls import (
    ContentDelta,
    ToolCallDelta,
    hermes,
    lanner_default,
    llama3,
    mistral,
    split_stream,
    syntax_for,
    syntax_named,
)
from lanner.engine.chatformat import builtin_format, resolve_chat_format
from lanner.engine.types import Finish, TextDelta, Timings, Usage
from lanner.errors import InvalidRequest

# Small templates written for these tests, each using its family's markers the way
# the real templates do (Qwen2.5, Llama 3.1, Mistral Small 3.1).
QWEN_LIKE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}"
    "{% endfor %}\n</tools>\nFor each call return <tool_call>{\"name\": ..., \"arguments\": ..."
    "}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}"
    "{% endif %}{% for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name"
    " }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA31_LIKE = (
    "<|begin_of_text|>{% if tools %}<|start_header_id|>user<|end_header_id|>\n\nGiven the "
    "following functions, please respond with a JSON for a function call. Respond in the "
    "format {\"name\": function name, \"parameters\": dictionary of argument name and its "
    "value}.{% for t in tools %}{{ t | tojson }}{% endfor %}<|eot_id|>{% endif %}"
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{% if m.tool_calls %}<|python_tag|>{{ m.tool_calls[0].function | tojson }}"
    "{% else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
MISTRAL_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{% if tools %}"
    "[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST]{{ m.content }}"
    "[/INST]{% elif m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | tojson }}{{ eos_token }}"
    "{% elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]"
    "{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
)

SUMS = {"type": "function", "function": {
    "name": "sums", "description": "Add two whole numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}

# One answer per syntax with text before the calls, two calls, and text after.
ANSWERS: dict[str, tuple[ModuleType, str]] = {
    "hermes": (hermes, 'Let me add.\n<tool_call>\n{"name": "sums", "arguments": {"a": 1, '
                       '"b": 2}}\n</tool_call>\n<tool_call>\n{"name": "echo", "arguments": '
                       '{"text": "a < b </tool"}}\n</tool_call>\nBoth called.'),
    "lanner": (lanner_default, 'Calling.<tool_call>[{"name": "sums", "arguments": {"a": 1, '
                               '"b": 2}}, {"name": "echo", "arguments": {"text": "a < b '
                               '</tool"}}]</tool_call> Both called.'),
    "mistral": (mistral, 'Let me add. [TOOL_CALLS] [{"name": "sums", "arguments": {"a": 1, '
                         '"b": 2}, "id": "abcDEF123"}, {"name": "echo", "arguments": '
                         '{"text": "a < b </tool"}}] Both called.'),
    "llama3": (llama3, ' {"name": "sums", "parameters": {"a": 1, "b": 2}}; {"name": "echo", '
                       '"parameters": {"text": "a < b </tool"}} Both called.'),
}
EXPECTED_CALLS = [("sums", {"a": 1, "b": 2}), ("echo", {"text": "a < b </tool"})]


def stream(module: ModuleType, text: str, size: int) -> list[ContentDelta | ToolCallDelta]:
    parser = module.StreamParser()
    out = []
    for i in range(0, len(text), size):
        out += parser.feed(text[i:i + size])
    return out + parser.finish()


def content_and_calls(deltas: list[ContentDelta | ToolCallDelta]) -> tuple[str, list]:
    text = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    calls = [d for d in deltas if isinstance(d, ToolCallDelta)]
    return text, calls


@pytest.mark.parametrize("name", list(ANSWERS))
def test_whole_text_two_calls_with_text_around(name: str) -> None:
    module, text = ANSWERS[name]
    content, calls = module.parse(text)
    assert [(c.name, c.arguments_dict()) for c in calls] == EXPECTED_CALLS
    if name == "llama3":  # calls open the answer; text may follow
        assert content == "Both called."
    elif name == "lanner":
        assert content == "Calling. Both called."
    else:
        assert content == "Let me add.\n\n\nBoth called." if name == "hermes" \
            else content == "Let me add.  Both called."
    assert len({c.id for c in calls}) == 2 and all(len(c.id) == 9 for c in calls)


@pytest.mark.parametrize("name", list(ANSWERS))
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 1000])
def test_streaming_agrees_with_whole_text(name: str, size: int) -> None:
    module, text = ANSWERS[name]
    content, calls = content_and_calls(stream(module, text, size))
    whole_content, whole_calls = module.parse(text)
    assert content.strip() == whole_content
    assert [(d.index, d.call.name, d.call.arguments) for d in calls] == \
        [(i, c.name, c.arguments) for i, c in enumerate(whole_calls)]


@pytest.mark.parametrize(("module", "prefix", "rest"), [
    (hermes, "x <tool", '_call>{"name": "f", "arguments": {}}</tool_call>'),
    (mistral, "x [TOOL_", 'CALLS] [{"name": "f", "arguments": {}}]'),
    (llama3, "x <|python", '_tag|>{"name": "f", "parameters": {}}'),
])
def test_text_that_may_start_a_marker_is_held_back(module: ModuleType, prefix: str,
                                                   rest: str) -> None:
    parser = module.StreamParser()
    assert parser.feed(prefix) == [ContentDelta("x ")]
    deltas = parser.feed(rest) + parser.finish()
    assert [d.call.name for d in deltas if isinstance(d, ToolCallDelta)] == ["f"]
    assert not [d for d in deltas if isinstance(d, ContentDelta) and d.text.strip()]


def test_held_back_text_that_is_no_marker_comes_out() -> None:
    parser = hermes.StreamParser()
    assert parser.feed("a <to") == [ContentDelta("a ")]
    assert parser.feed("p> b") == [ContentDelta("<top> b")]
    assert parser.feed(" <") == [ContentDelta(" ")]
    assert parser.finish() == [ContentDelta("<")]


def test_a_call_is_emitted_as_soon_as_it_closes() -> None:
    parser = hermes.StreamParser()
    deltas = parser.feed('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call> and')
    assert isinstance(deltas[0], ToolCallDelta) and deltas[0].call.name == "f"
    assert deltas[1:] == [ContentDelta(" and")]


def test_malformed_and_unclosed_calls() -> None:
    assert hermes.parse("<tool_call>{not json}</tool_call> ok") == \
        ("<tool_call>{not json}</tool_call> ok", [])
    assert hermes.parse('<tool_call>{"arguments": {}}</tool_call>')[1] == []  # no name
    content, calls = hermes.parse('Sure: <tool_call>\n{"name": "f", "arguments": {"x": 1}}')
    assert content == "Sure:" and calls[0].arguments_dict() == {"x": 1}  # closed by the end
    content, calls = hermes.parse('<tool_call>{"name": "f", "arguments": {"x": ')
    assert calls == [] and content.startswith("<tool_call>")  # nothing is lost


def test_llama3_plain_json_is_content_unless_a_call_at_the_start() -> None:
    assert llama3.parse('{"answer": 42}') == ('{"answer": 42}', [])
    text = 'The call is {"name": "f", "parameters": {}}'
    assert llama3.parse(text) == (text, [])
    content, calls = llama3.parse('Sure.<|python_tag|>{"name": "f", "parameters": {"q": 1}}')
    assert content == "Sure." and calls[0].arguments_dict() == {"q": 1}


def test_hermes_bare_object_without_tags_is_a_call_only_where_a_call_may_stand() -> None:
    # What Qwen2.5-Coder-0.5B writes for "What is 12 factorial?" with a python tool.
    text = ' {"name": "python", "arguments": {"code": "import math\\nmath.factorial(12)"}}'
    content, calls = hermes.parse(text)
    assert content == "" and [(c.name, c.arguments_dict()) for c in calls] == \
        [("python", {"code": "import math\nmath.factorial(12)"})]
    streamed, streamed_calls = content_and_calls(stream(hermes, text, 1))  # char by char
    assert streamed.strip() == "" and [d.call.name for d in streamed_calls] == ["python"]
    assert hermes.parse('{"answer": 42}') == ('{"answer": 42}', [])  # no name/arguments
    assert hermes.parse('{"name": "Ada"}') == ('{"name": "Ada"}', [])
    mid = 'The call is {"name": "f", "arguments": {}}'
    assert hermes.parse(mid) == (mid, [])  # not at the start: content
    content, calls = hermes.parse('{"name": "f", "arguments": {}}\nDone.')
    assert content == "Done." and [c.name for c in calls] == ["f"]


def test_mistral_per_call_form_with_ids() -> None:
    content, calls = mistral.parse(
        'Hi[TOOL_CALLS]sums[ARGS]{"a": 1, "b": 2}[TOOL_CALLS]echo[CALL_ID]xyz987abc[ARGS]'
        '{"text": "}"}')
    assert content == "Hi"
    assert [(c.name, c.arguments_dict()) for c in calls] == \
        [("sums", {"a": 1, "b": 2}), ("echo", {"text": "}"})]
    assert calls[1].id == "xyz987abc"
    assert [d.call.name for d in stream(mistral, "[TOOL_CALLS]sums[ARGS]{}", 1)
            if isinstance(d, ToolCallDelta)] == ["sums"]


def test_openai_shapes() -> None:
    _, calls = hermes.parse('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')
    delta = ToolCallDelta(0, calls[0])
    assert delta.to_openai() == {"index": 0, "id": calls[0].id, "type": "function",
                                 "function": {"name": "f", "arguments": '{"x": 1}'}}


def _fmt(template: str):  # noqa: ANN202 - a ChatFormat
    meta = ModelMetadata("test", template, "<s>", "</s>", 4096)
    return resolve_chat_format(meta)


@pytest.mark.parametrize(("template", "name"), [
    (QWEN_LIKE, "hermes"), (LLAMA31_LIKE, "llama3"), (MISTRAL_LIKE, "mistral"),
])
def test_syntax_is_looked_up_from_the_template(template: str, name: str) -> None:
    syntax = syntax_for(_fmt(template))
    assert syntax.name == name and syntax.native


def test_templates_that_know_no_tools_get_the_default(smollm2_gguf: Path) -> None:
    smollm2 = resolve_chat_format(read_metadata(smollm2_gguf))
    assert syntax_for(smollm2).name == "lanner" and not syntax_for(smollm2).native
    for builtin in ("chatml", "llama-2", "alpaca", "falcon"):
        assert syntax_for(builtin_format(builtin)).name == "lanner"
    with pytest.raises(InvalidRequest, match="unknown tool-call syntax"):
        syntax_named("nope")


HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add 1 and 2."},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abcDEF123", "type": "function",
         "function": {"name": "sums", "arguments": '{"a": 1, "b": 2}'}}]},
    {"role": "tool", "tool_call_id": "abcDEF123", "name": "sums", "content": "3"},
]


def test_native_rendering_passes_tools_and_object_arguments_to_the_template() -> None:
    text = syntax_named("hermes").render(_fmt(QWEN_LIKE), HISTORY, [SUMS])
    assert json.dumps(SUMS) in text
    assert '<tool_call>\n{"name": "sums", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in text
    assert "<|im_start|>tool\n3<|im_end|>" in text


def test_default_syntax_prompt_is_pinned(smollm2_gguf: Path) -> None:
    fmt = resolve_chat_format(read_metadata(smollm2_gguf))
    text = syntax_for(fmt).render(fmt, HISTORY, [SUMS])
    spec = json.dumps(SUMS["function"])
    assert text == (
        "<|im_start|>system\nBe brief.\n\n"
        "You can call tools (functions) to help you answer. These tools are available:\n"
        f"<tools>\n{spec}\n</tools>\n\n"
        "To call a tool, write the call in exactly this format and nothing else:\n"
        "<tool_call>\n"
        '{"name": "tool_name", "arguments": {"argument_name": "value"}}\n'
        "</tool_call>\n"
        "Write several <tool_call> blocks to call several tools. Each result comes back in a "
        "<tool_response> block; then answer the user's question using the results. If no "
        "tool is needed, answer directly.<|im_end|>\n"
        "<|im_start|>user\nAdd 1 and 2.<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "sums", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response name="sums">\n3\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n")


def test_default_syntax_without_tools_keeps_history_and_system() -> None:
    fmt = builtin_format("chatml")
    text = syntax_named("lanner").render(fmt, [*HISTORY, {"role": "tool", "name": "sums",
                                                          "content": "again"}], None)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "<tools>" not in text
    # two results in a row become one user message
    assert '</tool_response>\n<tool_response name="sums">\nagain' in text


def test_split_stream_turns_events_into_deltas() -> None:
    finish = Finish("stop", Usage(1, 2), Timings(0.0, 0.0))
    events = [TextDelta("Hi <tool_"), TextDelta('call>{"name": "f", "arguments": {}}</tool'),
              TextDelta("_call> <"), finish]
    out = list(split_stream(events, hermes.StreamParser()))
    assert out[0] == ContentDelta("Hi ")
    assert isinstance(out[1], ToolCallDelta) and out[1].call.name == "f"
    assert out[2:] == [ContentDelta(" "), ContentDelta("<"), finish]  # "<" held to the end


def test_hermes_reads_qwen3_coder_xml_bodies() -> None:
    text = ("Run it.\n<tool_call>\n<function=python>\n<parameter=code>\nprint(1)\n"
            "x = {\"a\": 1}\n</parameter>\n<parameter=n>\n3\n</parameter>\n</function>\n"
            "</tool_call>")
    content, calls = hermes.parse(text)
    assert content == "Run it."
    assert [(c.name, c.arguments_dict()) for c in calls] == \
        [("python", {"code": 'print(1)\nx = {"a": 1}', "n": 3})]
    streamed = [d for d in stream(hermes, text, 4) if isinstance(d, ToolCallDelta)]
    assert streamed[0].call.arguments == calls[0].arguments

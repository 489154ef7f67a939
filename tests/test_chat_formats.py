"""ChatFormat: rendering is byte-identical to transformers, built-in formats have
the documented structure, a missing template is an error, metadata reads fast."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pytest

from lanner.backends.base import ModelMetadata
from lanner.chat.metadata import read_metadata
from lanner.cli import chat_format as cli_verb
from lanner.engine.chatformat import (
    BUILTIN,
    ChatFormat,
    builtin_format,
    resolve_chat_format,
    validate_messages,
)
from lanner.errors import ChatFormatError, InvalidRequest

SYSTEM = {"role": "system", "content": "You are terse."}
U1 = {"role": "user", "content": "Hi there!"}
A1 = {"role": "assistant", "content": "Hello. How can I help?"}
U2 = {"role": "user", "content": "Name a prime < 10 & > 5."}

CONVERSATIONS = {
    "single turn": [U1],
    "multi-turn": [U1, A1, U2],
    "system prompt": [SYSTEM, U1, A1, U2],
}


def _metadata(template: str | None, **kw: Any) -> ModelMetadata:
    return ModelMetadata(architecture="test", chat_template=template, bos_token=kw.get("bos"),
                         eos_token=kw.get("eos"), n_ctx_train=2048, extra={"name": "tiny-test"})


def _hf_tokenizer(fmt: ChatFormat) -> Any:
    """A tiny offline fast tokenizer carrying the format's template and tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    special = {k: v for k, v in (("bos_token", fmt.bos_token), ("eos_token", fmt.eos_token),
                                 *fmt.extra_tokens) if v}
    vocab = {tok: i for i, tok in enumerate(["[UNK]", *dict.fromkeys(special.values())])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, "[UNK]")),
                                  **special)
    tok.chat_template = fmt.template
    return tok


def _reference(tok: Any, messages: list[dict[str, Any]], gen: bool, **kw: Any) -> str:
    text: str = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                        **kw)
    return text


# -- the bundled SmolLM2's own template ----------------------------------------


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def smol_format(smollm2_gguf: Path) -> ChatFormat:
    return resolve_chat_format(read_metadata(smollm2_gguf))


def test_smollm2_metadata_matches_transformers(smol_format: ChatFormat,
                                               smol_tokenizer: Any) -> None:
    assert smol_format.name == "model"
    assert smol_format.template == smol_tokenizer.chat_template
    ours = {"bos_token": smol_format.bos_token, "eos_token": smol_format.eos_token,
            **dict(smol_format.extra_tokens)}
    assert ours == smol_tokenizer.special_tokens_map
    assert smol_format.stop == ("<|im_end|>",)


@pytest.mark.parametrize("gen", [True, False], ids=["gen-prompt", "no-gen-prompt"])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_smollm2_render_is_byte_identical(smol_format: ChatFormat, smol_tokenizer: Any,
                                          conv: str, gen: bool) -> None:
    messages = CONVERSATIONS[conv]
    ours = smol_format.render(validate_messages(messages), add_generation_prompt=gen)
    assert ours == _reference(smol_tokenizer, messages, gen)
    # The template adds its default system prompt only when the caller gives none.
    assert ("You are a helpful AI assistant named SmolLM" in ours) == (conv != "system prompt")
    assert ours.endswith("<|im_start|>assistant\n") == gen


# -- built-in formats ----------------------------------------------------------


@pytest.mark.parametrize("gen", [True, False], ids=["gen-prompt", "no-gen-prompt"])
@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_render_is_byte_identical(name: str, gen: bool) -> None:
    fmt = builtin_format(name)
    tok = _hf_tokenizer(fmt)
    for messages in CONVERSATIONS.values():
        assert fmt.render(messages, add_generation_prompt=gen) == _reference(tok, messages, gen)


def test_template_features_match_transformers() -> None:
    """tojson (no HTML escaping, non-ASCII kept), tools, strftime_now, namespace,
    loop controls, trimming and the generation tag all behave as in transformers."""
    template = (
        "{% set ns = namespace(n=0) %}\n"
        "  {% for m in messages %}\n"
        "    {% if m.role == 'system' %}{% continue %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "{% generation %}[{{ ns.n }}:{{ m | tojson }}]{% endgeneration %}\n"
        "  {% endfor %}\n"
        "{% if tools %}TOOLS={{ tools | tojson(indent=2) }}{% endif %}\n"
        "{{ strftime_now('%Y') }}|{{ bos_token is defined }}|{{ eos_token }}"
    )
    fmt = resolve_chat_format(_metadata(template, eos="</s>"))
    tools = [{"type": "function", "function": {"name": "add", "description": "a <b> & 'ü'",
                                               "parameters": {"type": "object"}}}]
    messages: list[dict[str, Any]] = [SYSTEM, U1, {"role": "assistant", "content": None,
                             "tool_calls": [{"id": "c1", "function": {"name": "add"}}]}]
    ours = fmt.render(validate_messages(messages), tools=tools)
    assert ours == _reference(_hf_tokenizer(fmt), messages, True, tools=tools)
    assert '"a <b> & \'ü\'"' in ours and "|False|</s>" in ours
    assert '"content"' not in ours.split("[2:")[1]  # None content is dropped, as in HF


# -- Falcon structure ------------------------------------------------------------


def test_falcon_structure_exact() -> None:
    text = builtin_format("falcon").render([SYSTEM, U1, A1, U2])
    assert text == (
        "System: You are terse.\n"
        "User: Hi there!\n"
        "Falcon: Hello. How can I help?\n"
        "User: Name a prime < 10 & > 5.\n"
        "Falcon:"
    )
    assert builtin_format("falcon").stop == ("<|endoftext|>", "\nUser:")


def test_falcon_new_message_appears_once() -> None:
    """The release's sample format_prompt appended the new message inside the
    history loop, repeating it once per past turn; each message appears once here."""
    new = {"role": "user", "content": "NEW QUESTION"}
    history = [U1, A1, {"role": "user", "content": "Second?"}, {"role": "assistant",
                                                                "content": "Yes."}]
    text = builtin_format("falcon").render([SYSTEM, *history, new])
    assert text.count("NEW QUESTION") == 1
    assert text.count("User: ") == 3 and text.count("Falcon: ") == 2
    assert text.endswith("User: NEW QUESTION\nFalcon:")


def test_llama2_structure_exact() -> None:
    text = builtin_format("llama-2").render([SYSTEM, U1, A1, U2])
    assert text == ("<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there! [/INST] "
                    "Hello. How can I help? </s><s>[INST] Name a prime < 10 & > 5. [/INST]")


def test_alpaca_and_chatml_generation_prompts() -> None:
    alpaca = builtin_format("alpaca").render([U1])
    assert alpaca.startswith("<s>Below is an instruction that describes a task.")
    assert alpaca.endswith("### Instruction:\nHi there!\n\n### Response:\n")
    chatml = builtin_format("chatml").render([U1])
    assert chatml == "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"


# -- resolving and errors ----------------------------------------------------------


def test_no_template_and_no_override_is_an_error() -> None:
    with pytest.raises(ChatFormatError) as err:
        resolve_chat_format(_metadata(None, eos="</s>"))
    assert "tiny-test ships no chat template" in str(err.value)
    assert "--chat-format" in str(err.value) and "falcon" in str(err.value)


def test_override_builtin_uses_model_tokens() -> None:
    fmt = resolve_chat_format(_metadata(None, bos="<|begin|>", eos="<|end|>"), "llama-2")
    assert fmt.name == "builtin:llama-2"
    assert fmt.render([U1]) == "<|begin|>[INST] Hi there! [/INST]"
    assert fmt.stop == ("<|end|>",)


def test_override_wins_over_model_template(tmp_path: Path) -> None:
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<|eot_id|>")
    fmt = resolve_chat_format(_metadata("{{ 'model' }}", eos="</s>"), str(path))
    assert fmt.name == f"file:{path.resolve()}"
    assert fmt.render([U1]) == "<user>Hi there!<|eot_id|>"
    assert fmt.stop == ("</s>", "<|eot_id|>")
    with pytest.raises(ChatFormatError, match="no such chat template file"):
        resolve_chat_format(_metadata(None), str(tmp_path / "missing.jinja"))


def test_unknown_builtin_lists_known() -> None:
    for call in (lambda: builtin_format("vicuna"),
                 lambda: resolve_chat_format(_metadata("x"), "vicuna")):
        with pytest.raises(ChatFormatError) as err:
            call()
        assert "'vicuna'" in str(err.value)
        assert all(name in str(err.value) for name in BUILTIN)


def test_model_template_stop_strings_come_from_template_text() -> None:
    fmt = resolve_chat_format(_metadata("{{ '<|eot_id|>' }}{{ eos_token }}", eos="</s>"))
    assert fmt.stop == ("</s>", "<|eot_id|>")
    plain = resolve_chat_format(_metadata("{{ messages[0].content }}", eos="<|endoftext|>"))
    assert plain.stop == ("<|endoftext|>",)


def test_broken_templates_raise_chat_format_error() -> None:
    with pytest.raises(ChatFormatError, match="not valid Jinja"):
        resolve_chat_format(_metadata("{% for m in messages %}"))
    with pytest.raises(ChatFormatError, match="roles must alternate"):
        builtin_format("llama-2").render([U1, U2])
    with pytest.raises(ChatFormatError, match="falcon format has no tool role"):
        builtin_format("falcon").render([U1, {"role": "tool", "content": "42"}])
    sandbox = resolve_chat_format(_metadata("{{ messages.__class__ }}{{ ''.__class__.mro() }}"))
    with pytest.raises(ChatFormatError, match="failed to render"):
        sandbox.render([U1])


def test_template_hash_tracks_template_and_tokens() -> None:
    a = builtin_format("chatml")
    b = resolve_chat_format(_metadata(a.template, eos="<|im_end|>"))
    c = resolve_chat_format(_metadata(a.template, eos="</s>"))
    assert len(a.template_hash) == 64
    assert a.template_hash == b.template_hash != c.template_hash


@pytest.mark.parametrize("bad, needle", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([U1, "hi"], "item 1 is a str"),
    ([{"role": "bot", "content": "x"}], "role 'bot'"),
    ([{"role": "user", "content": 5}], "content must be a string"),
    ([{"role": "user"}], "content must be a string"),
    ([{"role": "assistant", "content": None}], "content must be a string"),
])
def test_validate_messages_errors_name_messages(bad: object, needle: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        validate_messages(bad)
    assert err.value.param == "messages"
    assert str(err.value).startswith("messages: ") and needle in str(err.value)


def test_validate_messages_returns_clean_copy() -> None:
    call: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}
    given = [U1, call, {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    clean = validate_messages(given)
    assert clean == given
    clean[1]["tool_calls"][0]["id"] = "changed"
    assert call["tool_calls"][0]["id"] == "c1"


# -- metadata ------------------------------------------------------------------------


def test_read_metadata_bundled_gguf_is_fast(smollm2_gguf: Path) -> None:
    start = time.perf_counter()
    meta = read_metadata(smollm2_gguf)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0
    assert meta.architecture == "llama"
    assert meta.chat_template is not None and "<|im_start|>" in meta.chat_template
    assert (meta.bos_token, meta.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert meta.n_ctx_train == 8192


def test_read_metadata_tinycoder_has_llama_tokens_and_no_template(tinycoder_gguf: Path) -> None:
    meta = read_metadata(tinycoder_gguf)
    assert (meta.architecture, meta.bos_token, meta.eos_token) == ("llama", "<s>", "</s>")
    assert meta.chat_template is None
    with pytest.raises(ChatFormatError, match="--chat-format"):
        resolve_chat_format(meta)


def test_read_metadata_hf_folder_matches_saved_tokenizer(tmp_path: Path) -> None:
    fmt = builtin_format("llama-2")
    tok = _hf_tokenizer(fmt)
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                      "max_position_embeddings": 4096}))
    meta = read_metadata(tmp_path)
    assert (meta.architecture, meta.n_ctx_train) == ("llama", 4096)
    assert (meta.chat_template, meta.bos_token, meta.eos_token) == (fmt.template, "<s>", "</s>")
    # chat_template.jinja wins over the config's entry, as in transformers.
    (tmp_path / "chat_template.jinja").write_text("{{ 'file' }}")
    assert read_metadata(tmp_path).chat_template == "{{ 'file' }}"


# -- CLI -----------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home")
    cli_verb.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_cli_prints_prompt_exactly(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["chat-format", "smollm2", "--system", "Be brief."]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert out.endswith("And of Italy?<|im_end|>\n<|im_start|>assistant\n")
    assert "chat format: model" in err and '"<|im_end|>"' in err


def test_cli_json_with_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["chat-format", "tinycoder", "--chat-format", "falcon", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chat_format"] == "builtin:falcon"
    assert report["stop"] == ["</s>", "\nUser:"]
    assert report["prompt"].startswith("System: You are a helpful assistant.\nUser: ")
    assert report["prompt"].endswith("User: And of Italy?\nFalcon:")


def test_cli_model_without_template_names_the_flag() -> None:
    with pytest.raises(ChatFormatError, match="--chat-format"):
        _cli(["chat-format", "tinycoder"])

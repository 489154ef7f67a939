"""ChatFormat: how a model expects a conversation to look, and where to stop.

A ChatFormat is a Jinja chat template plus the model's special tokens and the
end-of-turn strings a generator must stop at. It comes from the model's own
template when the model ships one, else from an explicit override (a built-in
name or a ``.jinja`` file). A model with neither is an error, never a silent
ChatML fallback.

Rendering is byte-identical to transformers'
``tokenizer.apply_chat_template(messages, tokenize=False, ...)``: the same sandboxed
Jinja environment, globals and ``tojson`` filter, and the same template variables
(the named special tokens, ``messages``, ``tools``, ``documents``,
``add_generation_prompt``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lanner.backends.base import ModelMetadata
from lanner.errors import ChatFormatError, InvalidRequest

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class _Builtin:
    bos_token: str
    eos_token: str
    end_of_turn: tuple[str, ...]
    """Strings that end a model turn besides the EOS token."""
    description: str


# Formats for checkpoints that ship no template. bos/eos are the defaults used when
# no model is given; with a model, the model's own tokens are used.
_BUILTINS: dict[str, _Builtin] = {
    "chatml": _Builtin("", "<|im_end|>", ("<|im_end|>",),
                       "<|im_start|>role ... <|im_end|> (OpenAI ChatML)"),
    "llama-2": _Builtin("<s>", "</s>", (),
                        "<s>[INST] <<SYS>> ... [/INST] answer </s> (Llama-2-chat)"),
    "alpaca": _Builtin("<s>", "</s>", ("\n### Instruction:",),
                       "### Instruction: / ### Response: (Stanford Alpaca)"),
    "falcon": _Builtin("", "<|endoftext|>", ("\nUser:",),
                       "System: / User: / Falcon: lines (Falcon-180B-chat)"),
}
BUILTIN: tuple[str, ...] = tuple(_BUILTINS)

# End-of-turn markers that a model's own template may use; each is a stop string
# only when that exact text appears in the template (look-up by data, not by name).
_TEMPLATE_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")

# Reasoning is passed to templates under several names (transformers' aliasing).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@dataclass(frozen=True)
class ChatFormat:
    """A chat template with the tokens and stop strings that belong to it."""

    name: str
    """Where it came from: "model", "builtin:<name>" or "file:<path>"."""
    template: str
    """Jinja source."""
    bos_token: str
    """"" if the model has none."""
    eos_token: str
    """"" if the model has none."""
    stop: tuple[str, ...]
    """End-of-turn strings the generator must stop at (EOS text included)."""
    extra_tokens: tuple[tuple[str, str], ...] = ()
    """Other special tokens passed to the template, as transformers does
    (("unk_token", "<unk>"), ("pad_token", ...), ...)."""

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text, exactly as transformers' ``apply_chat_template(...,
        tokenize=False)`` renders it. ``messages`` should come from
        ``validate_messages``. Raises ChatFormatError if the template fails."""
        variables: dict[str, Any] = {**self._special_tokens(), "messages":
                                     _template_messages(messages), "tools": tools,
                                     "documents": None,
                                     "add_generation_prompt": add_generation_prompt}
        compiled = _compile(self.template, self.name)
        try:
            return compiled.render(**variables)
        # Errors raised by template code (raise_exception, undefined names, bad
        # operands) are the template's problem, reported as such.
        except (jinja2.TemplateError, TypeError, ValueError, LookupError,
                ArithmeticError) as exc:
            raise ChatFormatError(f"chat template ({self.name}) failed to render: {exc}") from exc

    @property
    def template_hash(self) -> str:
        """sha256 hex of the template and the BOS/EOS strings (logged as provenance)."""
        data = "\0".join((self.template, self.bos_token, self.eos_token))
        return hashlib.sha256(data.encode("utf-8")).hexdigest()

    def _special_tokens(self) -> dict[str, str]:
        # transformers passes only the tokens the tokenizer has; an absent one is
        # undefined in the template (so `bos_token is defined` behaves the same).
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                  **dict(self.extra_tokens)}
        return {k: v for k, v in tokens.items() if v}


def builtin_format(name: str, metadata: ModelMetadata | None = None) -> ChatFormat:
    """A built-in format by name ("chatml", "llama-2", "alpaca", "falcon").

    With ``metadata``, the model's own BOS/EOS strings replace the built-in
    defaults (a model's special tokens are its own). Unknown name: ChatFormatError
    listing the known ones.
    """
    data = _BUILTINS.get(name)
    if data is None:
        raise ChatFormatError(f"unknown chat format {name!r} (known: {', '.join(BUILTIN)}; "
                              "or a path to a .jinja file)")
    template = resources.files("lanner.engine").joinpath(
        f"chat_templates/{name}.jinja").read_text(encoding="utf-8")
    extra: tuple[tuple[str, str], ...] = ()
    bos, eos = data.bos_token, data.eos_token
    if metadata is not None:
        bos, eos, extra = _model_tokens(metadata)
    stop = _dedupe((eos, *data.end_of_turn))
    return ChatFormat(f"builtin:{name}", template, bos, eos, stop, extra)


def resolve_chat_format(metadata: ModelMetadata, override: str | None = None,
                        fallback: str | None = None) -> ChatFormat:
    """The format to use for a model.

    ``override`` (a built-in name or a path to a .jinja file) wins; else the
    model's own ``chat_template``; else ``fallback`` (the format its registry
    entry names for a template-less checkpoint, from the catalog at pull time);
    else ChatFormatError telling the user to pass --chat-format. The template
    is compiled here, so a broken one fails early.
    """
    if override:
        fmt = _override_format(metadata, override)
    elif metadata.chat_template:
        fmt = _model_format(metadata, "model", metadata.chat_template)
    elif fallback:
        fmt = _override_format(metadata, fallback)
    else:
        model = metadata.extra.get("name") or metadata.architecture
        raise ChatFormatError(
            f"model {model} ships no chat template; pass --chat-format "
            f"(one of: {', '.join(BUILTIN)}; or a path to a .jinja file)")
    _compile(fmt.template, fmt.name)
    return fmt


def validate_messages(messages: object) -> list[dict[str, Any]]:
    """Check a conversation and return a clean (deep) copy of it.

    Each message is a dict with a known ``role`` (system, user, assistant, tool)
    and a string ``content``; an assistant message carrying ``tool_calls`` may
    have ``content`` None or absent. Errors are InvalidRequest("messages", ...).
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest("messages", f"item {i} is a {type(message).__name__}, "
                                 "not an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest("messages", f"item {i} has role {role!r} "
                                 f"(allowed: {', '.join(ROLES)})")
        content = message.get("content")
        tool_call = role == "assistant" and bool(message.get("tool_calls"))
        if not isinstance(content, str) and not (content is None and tool_call):
            raise InvalidRequest("messages", f"item {i} ({role}): content must be a string, "
                                 f"got {type(content).__name__}")
        clean.append(_copy(message))
    return clean


def read_template_file(path: Path) -> str:
    """A .jinja file's text; ChatFormatError if it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatFormatError(f"cannot read chat template {path}: {exc}") from exc


# -- helpers -------------------------------------------------------------------


def _override_format(metadata: ModelMetadata, override: str) -> ChatFormat:
    if override in _BUILTINS:
        return builtin_format(override, metadata)
    path = Path(override).expanduser()
    if path.suffix == ".jinja" or path.exists():
        if not path.is_file():
            raise ChatFormatError(f"no such chat template file: {path}")
        return _model_format(metadata, f"file:{path.resolve()}", read_template_file(path))
    return builtin_format(override)  # raises, listing the known names


def _model_format(metadata: ModelMetadata, name: str, template: str) -> ChatFormat:
    bos, eos, extra = _model_tokens(metadata)
    markers = tuple(m for m in _TEMPLATE_END_OF_TURN if m in template)
    return ChatFormat(name, template, bos, eos, _dedupe((eos, *markers)), extra)


def _model_tokens(metadata: ModelMetadata) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """The model's BOS, EOS and other named special tokens (from
    ``metadata.extra["special_tokens"]``, as read_metadata writes it)."""
    special = metadata.extra.get("special_tokens")
    extra: tuple[tuple[str, str], ...] = ()
    if isinstance(special, dict):
        extra = tuple((str(k), str(v)) for k, v in special.items()
                      if k not in ("bos_token", "eos_token") and v)
    return metadata.bos_token or "", metadata.eos_token or "", extra


def _dedupe(strings: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for s in strings if s))


def _copy(value: Any) -> Any:
    """A deep copy of JSON-like data (dicts, lists, tuples, scalars)."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy(v) for v in value]
    return value


def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as transformers hands them to a template: None-valued keys
    dropped (templates handle a missing key better than a None), reasoning
    copied under its aliases."""
    out = []
    for message in messages:
        m = {k: _copy(v) for k, v in message.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


@lru_cache(maxsize=64)
def _compile(template: str, name: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatFormatError(
            f"chat template ({name}) is not valid Jinja: {exc} (line {exc.lineno})") from exc


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for loss
    masking in transformers; for rendering it is a pass-through."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return str(caller())


class _TemplateDict:
    # ``dict(...)`` for templates without exposing the dict type itself.
    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Namespaces refuse underscore names, so templates cannot reach CPython internals.
    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for key in attrs:
            _TemplateNamespace._check_name(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment transformers renders chat templates with."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env

"""A loaded model: the notebook-facing API (generate, stream, chat, logprobs).

It joins a Backend (how to run the weights) with a ChatFormat (how the model
expects a conversation to look). Options are keyword arguments validated exactly
like the CLI's flags: through ``Request``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from lanner.backends.base import Backend
from lanner.engine.chatformat import ChatFormat, resolve_chat_format, validate_messages
from lanner.engine.registry import ModelSpec
from lanner.engine.types import Event, Request, collect
from lanner.errors import ContextLengthExceeded, InvalidRequest

_OPTIONS = {f.name for f in dataclasses.fields(Request)} - {"prompt"}


def make_request(prompt: str | Sequence[int], options: dict[str, Any]) -> Request:
    """Build a Request from keyword options; an unknown option is an error naming it."""
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise InvalidRequest(unknown[0], f"unknown option (known: {', '.join(sorted(_OPTIONS))})")
    if isinstance(options.get("stop"), str):
        options = {**options, "stop": (options["stop"],)}
    elif options.get("stop") is not None:
        options = {**options, "stop": tuple(options["stop"])}
    return Request(prompt=prompt, **options)


class Model:
    def __init__(
        self, spec: ModelSpec, backend: Backend, *, chat_format_override: str | None = None
    ) -> None:
        self.spec = spec
        self.backend = backend
        self._chat_format_override = chat_format_override
        self._chat_format: ChatFormat | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def chat_format(self) -> ChatFormat:
        """Resolved on first use, so a model with no template can still run raw prompts."""
        if self._chat_format is None:
            self._chat_format = resolve_chat_format(
                self.backend.metadata, self._chat_format_override, self.spec.chat_format
            )
        return self._chat_format

    # -- building requests -------------------------------------------------

    def chat_request(
        self, messages: list[dict[str, Any]], *, strict_context: bool = False, **options: Any
    ) -> Request:
        """Render messages with the model's chat format and tokenize them exactly
        as the model expects (the template writes the special tokens itself)."""
        fmt = self.chat_format
        text = fmt.render(validate_messages(messages), add_generation_prompt=True)
        ids = self.backend.tokenize(text, add_bos=False, special=True)
        stop = tuple(dict.fromkeys([*(options.pop("stop", None) or ()), *fmt.stop]))
        request = make_request(ids, {**options, "stop": stop})
        self.check_context(len(ids), request.max_tokens if strict_context else None)
        return request

    def completion_request(
        self, prompt: str, *, strict_context: bool = False, **options: Any
    ) -> Request:
        """A raw prompt: no chat template, BOS added as the model wants."""
        ids = self.backend.tokenize(prompt, add_bos=True, special=False)
        request = make_request(ids, dict(options))
        self.check_context(len(ids), request.max_tokens if strict_context else None)
        return request

    def check_context(self, prompt_tokens: int, max_tokens: int | None = None) -> None:
        """The prompt must leave room for at least one new token (or for
        ``max_tokens`` of them when given)."""
        n_ctx = self.backend.n_ctx
        if prompt_tokens >= n_ctx:
            raise ContextLengthExceeded(prompt_tokens, n_ctx)
        if max_tokens is not None and prompt_tokens + max_tokens > n_ctx:
            raise ContextLengthExceeded(prompt_tokens, n_ctx, max_tokens)

    # -- the notebook API ---------------------------------------------------

    def stream(
        self, prompt: str, *, system: str | None = None, raw: bool = False, **options: Any
    ) -> Iterator[Event]:
        """Stream the answer to one prompt (chat-formatted unless ``raw``)."""
        if raw:
            if system is not None:
                raise InvalidRequest("system", "a raw prompt has no system message")
            return self.backend.stream(self.completion_request(prompt, **options))
        return self.chat_stream(_messages(prompt, system), **options)

    def generate(self, prompt: str, **options: Any) -> str:
        """The whole answer to one prompt, as text."""
        return collect(self.stream(prompt, **options)).text

    def chat_stream(self, messages: list[dict[str, Any]], **options: Any) -> Iterator[Event]:
        return self.backend.stream(self.chat_request(messages, **options))

    def chat(self, messages: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
        """Messages in, the assistant's message out."""
        result = collect(self.chat_stream(messages, **options))
        return {"role": "assistant", "content": result.text}

    def logprobs(self, context: str, continuation: str) -> float:
        """log P(continuation | context), summed over its tokens."""
        return self.backend.loglikelihood(context, continuation)[0]

    def close(self) -> None:
        self.backend.close()

    def __repr__(self) -> str:
        return f"<lanner.Model {self.name} ({self.backend.name}, {self.spec.path})>"


def _messages(prompt: str, system: str | None) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": prompt}]

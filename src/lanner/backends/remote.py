"""A remote engine as a backend: any OpenAI-compatible server (vLLM, TGI,
Ollama, llama.cpp's server, another ``lanner serve``, OpenAI itself),
registered with ``lanner remote add NAME URL``.

Lanner never sees the server's tokenizer, so a remote model's "token ids" are
the characters of its text (id = code point): every service that renders a
prompt, tokenizes it and sends ids works unchanged, and ``stream`` turns the
ids back into text. The model's chat template is a pass-through that writes
the messages as JSON behind a marker; ``stream`` recognises it and calls
``/v1/chat/completions``, so the server applies its own template. Any other
prompt (a raw completion, or one rendered with ``--chat-format``) goes to
``/v1/completions``. Consequences, all stated in errors or here:

- ``n_ctx`` is the server's window in tokens times ``CHARS_PER_TOKEN``: the
  local context check counts characters and is a rough one; the server's own
  check is exact and its refusal is reported as an InvalidRequest.
- ``loglikelihood`` needs ``/v1/completions`` with ``echo`` and ``logprobs``
  (vLLM, llama.cpp's server, ``lanner serve``); a server without them gets
  NotSupported naming the limitation. The server tokenizes context and
  continuation together; the tokens that start within the continuation are
  scored (where the server merges a token across the boundary, it counts as
  context, and a continuation inside one token cannot be scored).
- Token usage comes from the server (``stream_options.include_usage``); each
  request's usage and cost (``prices.toml``) go to ``remote-usage.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from lanner.backends.base import ModelMetadata
from lanner.backends.remote_http import RemoteClient, Retry, events
from lanner.backends.remote_prices import price_for, read_prices, record
from lanner.engine.textstream import StopBuffer
from lanner.engine.types import (
    Event,
    Finish,
    FinishReason,
    Request,
    TextDelta,
    Timings,
    Token,
    TopLogprob,
    Usage,
)
from lanner.errors import InvalidRequest, LannerError, ModelNotFound, NotSupported

CHAT_MARK = "\ue000lanner-chat\ue000"
"""Begins a prompt that carries messages, not text (private-use characters)."""
PASSTHROUGH_TEMPLATE = CHAT_MARK + "{{ messages | tojson }}"
CHARS_PER_TOKEN = 4
DEFAULT_WINDOW = 4096
"""Tokens, when neither ``--context`` nor the server's /v1/models says."""
MAX_STOP = 4
"""OpenAI takes at most 4 stop strings; the rest are enforced here."""
_MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})
_WINDOW_KEYS = ("max_model_len", "context_length", "context_window", "max_context_length",
                "n_ctx", "n_ctx_train")


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """One ``lanner remote add`` entry (kept in models.json with format "remote")."""

    name: str
    url: str
    """Base URL of the OpenAI API, normally ending in /v1."""
    model: str
    """The model id the server knows it by."""
    api_key_env: str | None = None
    """Environment variable holding the API key (the key itself is never stored)."""
    context: int | None = None
    """The server's context window in tokens, when known."""
    timeout_s: float = 120.0
    """Longest silence allowed from the server, also between streamed chunks."""
    extra_sampling: bool = False
    """Also send top_k, min_p and repetition_penalty (vLLM, llama.cpp, lanner
    serve take them; OpenAI refuses unknown fields)."""

    @classmethod
    def from_entry(cls, name: str, entry: dict[str, Any]) -> RemoteConfig:
        context = entry.get("context")
        return cls(name, str(entry["path"]), str(entry.get("model") or ""),
                   entry.get("api_key_env") or None, int(context) if context else None,
                   float(entry.get("timeout_s") or 120.0), bool(entry.get("extra_sampling")))

    def to_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"path": self.url, "format": "remote", "model": self.model,
                                 "source": f"remote engine at {self.url}",
                                 "timeout_s": self.timeout_s}
        if self.api_key_env:
            entry["api_key_env"] = self.api_key_env
        if self.context:
            entry["context"] = self.context
        if self.extra_sampling:
            entry["extra_sampling"] = True
        return entry

    def api_key(self) -> str | None:
        import os

        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise LannerError(f"remote {self.name} reads its API key from ${self.api_key_env}, "
                              "which is not set")
        return key


def normalise_url(url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1``; a URL with a path is kept."""
    parsed = httpx.URL(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidRequest("URL", f"{url!r} is not an http(s) URL")
    text = str(parsed).rstrip("/")
    return text + "/v1" if parsed.path in ("", "/") else text


def server_models(client: RemoteClient) -> list[dict[str, Any]]:
    """The server's /models list (OpenAI's ``{"data": [{"id": ...}]}``)."""
    body = client.get("models")
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise LannerError(f"{client.label}: /models did not answer with a model list")
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def window_of(card: dict[str, Any]) -> int | None:
    """The context window a /models entry states, under any of the names
    servers use (vLLM ``max_model_len``, llama.cpp ``meta.n_ctx_train``, ...)."""
    for source in (card, card.get("meta") or {}):
        for key in _WINDOW_KEYS:
            value = source.get(key) if isinstance(source, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


class RemoteBackend:
    name = "remote"
    n_seq_max = 8
    """Requests an evaluation sends at once: the server does the batching."""

    def __init__(self, config: RemoteConfig, home: Path, *, n_ctx: int | None = None,
                 transport: httpx.BaseTransport | None = None,
                 retry: Retry | None = None) -> None:
        if not config.model:
            raise LannerError(f"remote {config.name} names no model; add it again with --model")
        self.config = config
        self.home = home
        self.version = f"{config.model} at {config.url}"
        self._client = RemoteClient(config.url, label=f"remote {config.name} ({config.url})",
                                    api_key=config.api_key(), timeout_s=config.timeout_s,
                                    retry=retry, transport=transport)
        window = n_ctx or config.context or self._server_window() or DEFAULT_WINDOW
        self.n_ctx = window * CHARS_PER_TOKEN
        self.metadata = ModelMetadata(
            architecture="remote", chat_template=PASSTHROUGH_TEMPLATE, bos_token=None,
            eos_token=None, n_ctx_train=window,
            extra={"name": config.model, "url": config.url, "window_tokens": window})

    def _server_window(self) -> int | None:
        """The window /models states for this model; None if it says nothing.
        An unreachable server fails here, at load, with the reason."""
        cards = server_models(self._client)
        card = next((c for c in cards if c["id"] == self.config.model), None)
        if card is None:
            known = ", ".join(c["id"] for c in cards) or "none"
            raise ModelNotFound(f"remote {self.config.name}: the server does not serve "
                                f"{self.config.model!r} (it serves: {known})")
        return window_of(card)

    # -- tokens are characters ------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def detokenize(self, ids: Sequence[int]) -> str:
        bad = next((i for i in ids if not 0 <= i <= 0x10FFFF or 0xD800 <= i <= 0xDFFF), None)
        if bad is not None:
            raise InvalidRequest("prompt", f"token id {bad} is not a character (a remote "
                                 "model's ids are the code points of its text)")
        return "".join(chr(i) for i in ids)

    # -- generation -----------------------------------------------------------

    def stream(self, request: Request) -> Generator[Event, None, None]:
        text = request.prompt if isinstance(request.prompt, str) \
            else self.detokenize(request.prompt)
        chat = text.startswith(CHAT_MARK)
        path = "chat/completions" if chat else "completions"
        payload = self._payload(request, chat)
        if chat:
            payload["messages"] = _openai_messages(json.loads(text[len(CHAT_MARK):]))
        else:
            payload["prompt"] = text
        start = time.perf_counter()
        state = _StreamState(len(text))
        try:
            yield from self._events(path, payload, request, chat, state, start)
        finally:
            if state.sent:
                self._record(path, state)

    def _events(self, path: str, payload: dict[str, Any], request: Request, chat: bool,
                state: _StreamState, start: float) -> Iterator[Event]:
        buffer = StopBuffer(request.stop)
        ttft = 0.0
        try:
            response = self._client.post(path, payload)
        except ModelNotFound as exc:
            if chat:
                raise
            raise NotSupported(f"{exc}. A raw prompt needs /v1/completions, which chat-only "
                               "servers lack: chat works, and `lanner eval --chat-template` "
                               "sends evaluation prompts as chat") from exc
        state.sent = True
        try:
            for chunk in events(response, self._client.label):
                state.take_usage(chunk.get("usage"))
                for choice in chunk.get("choices") or ():
                    text, tokens = _choice_delta(choice, chat)
                    state.reason = choice.get("finish_reason") or state.reason
                    if not text:
                        continue
                    ttft = ttft or time.perf_counter() - start
                    state.chunks += 1
                    yield from _pushed(buffer, text, tokens)
                    if buffer.hit:
                        state.reason = "stop"
                        break
                if buffer.hit:
                    break  # closing the response stops the server's generation
        finally:
            response.close()
        if not buffer.hit and (tail := buffer.flush()):
            yield tail
        state.finished = True
        reason: FinishReason = "length" if state.reason == "length" else "stop"
        yield Finish(reason, self._priced(state.usage()),
                     Timings(ttft, time.perf_counter() - start))

    def _payload(self, request: Request, chat: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.config.model, "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": request.temperature, "top_p": request.top_p,
        }
        if request.max_tokens is not None:
            payload["max_tokens"] = request.max_tokens
        if request.seed is not None:
            payload["seed"] = request.seed
        if request.stop:
            payload["stop"] = list(request.stop[:MAX_STOP])
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(request, name):
                payload[name] = getattr(request, name)
        if self.config.extra_sampling:
            payload.update(top_k=request.top_k, min_p=request.min_p,
                           repetition_penalty=request.repetition_penalty)
        if request.wants_logprobs:
            if chat:
                payload.update(logprobs=True, top_logprobs=request.top_logprobs)
            else:
                payload["logprobs"] = max(request.top_logprobs, 1)
        if request.constraint is not None:
            payload["response_format"] = _response_format(request, chat)
        return payload

    def _priced(self, usage: Usage) -> Usage:
        """``usage`` with its cost from the home's price table (none if unpriced)."""
        price = price_for(read_prices(self.home), self.config.name, self.config.model)
        if price is None:
            return usage
        return dataclasses.replace(
            usage, cost=round(price.cost(usage.prompt_tokens, usage.completion_tokens), 8),
            currency=price.currency)

    def _record(self, path: str, state: _StreamState) -> None:
        usage = self._priced(state.usage())
        record(self.home, {
            "remote": self.config.name, "model": self.config.model, "url": self.config.url,
            "endpoint": path, "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "usage_from_server": state.server_usage is not None,
            "finish": state.reason if state.finished else "cancelled",
            "cost": usage.cost, "currency": usage.currency,
        })

    # -- scoring --------------------------------------------------------------

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """Through ``/v1/completions`` with ``echo`` and ``logprobs`` (see the module
        docstring); NotSupported where the server offers no prompt logprobs."""
        if not continuation:
            return 0.0, True
        text = context + continuation
        payload = {"model": self.config.model, "prompt": text, "max_tokens": 1,
                   "temperature": 0.0, "logprobs": 1, "echo": True}
        try:
            response = self._client.post("completions", payload)
        except (InvalidRequest, ModelNotFound) as exc:
            raise NotSupported(self._no_scoring(f"it refused echo with logprobs ({exc})")) \
                from exc
        try:
            response.read()
            body = response.json()
        finally:
            response.close()
        self._record_scoring(body)
        lp = ((body.get("choices") or [{}])[0] or {}).get("logprobs") or {}
        needed = ("tokens", "token_logprobs", "text_offset")
        if not all(isinstance(lp.get(k), list) for k in needed):
            raise NotSupported(self._no_scoring("its answer has no prompt tokens with "
                                                "logprobs and text offsets"))
        return _score_span(lp, text, len(context), len(text), self._no_scoring)

    def _no_scoring(self, why: str) -> str:
        return (f"remote {self.config.name} cannot score loglikelihoods: {why}. Scoring needs "
                "/v1/completions with echo and logprobs (vLLM, llama.cpp's server, lanner "
                "serve); chat-only servers can run generate_until tasks only")

    def _record_scoring(self, body: dict[str, Any]) -> None:
        state = _StreamState(0)
        state.take_usage(body.get("usage"))
        state.finished, state.reason = True, "stop"
        self._record("completions (echo)", state)

    def close(self) -> None:
        self._client.close()


class _StreamState:
    """What one request has seen so far: for the Finish and the ledger."""

    def __init__(self, prompt_chars: int) -> None:
        self.prompt_chars = prompt_chars
        self.chunks = 0
        self.reason: str | None = None
        self.server_usage: Usage | None = None
        self.sent = False
        self.finished = False

    def take_usage(self, usage: object) -> None:
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            self.server_usage = Usage(usage["prompt_tokens"],
                                      int(usage.get("completion_tokens") or 0))

    def usage(self) -> Usage:
        """The server's count; without one, an estimate (a chunk a token,
        CHARS_PER_TOKEN characters a prompt token), flagged in the ledger."""
        if self.server_usage is not None:
            return self.server_usage
        return Usage(-(-self.prompt_chars // CHARS_PER_TOKEN), self.chunks)


def _openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with OpenAI's fields only: Lanner's own markers (such as the
    tool loop's ``_results``) are refused by strict servers."""
    return [{k: v for k, v in m.items() if k in _MESSAGE_FIELDS} for m in messages]


def _choice_delta(choice: dict[str, Any], chat: bool) -> tuple[str, list[Token]]:
    """A streamed choice's new text and, when logprobs were asked for, its tokens."""
    if chat:
        text = (choice.get("delta") or {}).get("content") or ""
        content = (choice.get("logprobs") or {}).get("content") or []
        tokens = [Token(-1, c.get("token", ""), c.get("logprob"),
                        tuple(TopLogprob(t.get("token", ""), t.get("logprob", 0.0))
                              for t in c.get("top_logprobs") or ()))
                  for c in content]
        return text, tokens
    text = choice.get("text") or ""
    lp = choice.get("logprobs") or {}
    tops = lp.get("top_logprobs") or []
    tokens = [Token(-1, t, lp_, tuple(TopLogprob(k, v) for k, v in (top or {}).items()))
              for t, lp_, top in zip(lp.get("tokens") or [], lp.get("token_logprobs") or [],
                                     tops or [None] * len(lp.get("tokens") or []),
                                     strict=False)]
    return text, tokens


def _pushed(buffer: StopBuffer, text: str, tokens: list[Token]) -> Iterator[TextDelta]:
    """Feed one chunk to the stop buffer, token by token when the tokens spell it."""
    pieces = [(t.text, t) for t in tokens] if "".join(t.text for t in tokens) == text \
        and tokens else [(text, Token(-1, text))]
    for piece, token in pieces:
        delta = buffer.push(piece, token)
        if delta:
            yield delta
        if buffer.hit:
            return


def _response_format(request: Request, chat: bool) -> dict[str, Any]:
    constraint = request.constraint
    assert constraint is not None
    if constraint.kind != "json_schema" or not chat:
        raise NotSupported(f"{constraint.field}: a remote model takes only a JSON schema, "
                           "in a chat (the server's response_format)")
    return {"type": "json_schema",
            "json_schema": {"name": "output", "schema": json.loads(constraint.source),
                            "strict": True}}


def _offsets(lp: dict[str, Any], text: str) -> list[int]:
    """Where each echoed token starts in ``text``. From the tokens themselves
    when they spell the text (after a leading space some servers add with a
    SentencePiece tokenizer, which shifts their ``text_offset`` by one), else
    the server's ``text_offset``."""
    tokens = [t if isinstance(t, str) else "" for t in lp["tokens"]]
    joined = "".join(tokens)
    lead = joined.find(text) if text else -1
    if lead < 0 or joined[:lead].strip():
        return [int(o) for o in lp["text_offset"]]
    out, at = [], -lead
    for token in tokens:
        out.append(max(at, 0))
        at += len(token)
    return out


def _score_span(lp: dict[str, Any], text: str, start: int, end: int,
                why: Any) -> tuple[float, bool]:
    """Sum the logprobs of the echoed tokens that start in [start, end) of the
    prompt text; greedy when each was its position's most likely token."""
    total, greedy, seen = 0.0, True, False
    tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
    for logprob, offset, top in zip(lp["token_logprobs"], _offsets(lp, text), tops,
                                    strict=False):
        if offset >= end:
            break  # the generated token (max_tokens 1) and beyond
        if offset < start:
            continue  # the context's (a token across the boundary counts as context)
        if logprob is None:
            raise NotSupported(why("the first token of the prompt has no logprob"))
        seen = True
        total += float(logprob)
        if isinstance(top, dict) and top:
            greedy = greedy and float(logprob) >= max(float(v) for v in top.values()) - 1e-6
    if not seen:
        raise NotSupported(why("no echoed token covers the continuation"))
    return total, greedy

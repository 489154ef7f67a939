"""A conversation with one model, every turn logged to the Store with provenance.

The context window: ``context()`` says how much of it the conversation fills;
with an ``on_drop`` observer, a turn that would not fit drops the oldest turns
(never the system prompt) and tells the observer, instead of failing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from lanner.backends import rope
from lanner.engine.chatformat import validate_messages
from lanner.engine.model import Model
from lanner.engine.types import Event, Finish, Request, TextDelta, speculation_log
from lanner.store import Store, Turn, new_conversation_id

_DEFAULT_MAX_TOKENS = next(f.default for f in dataclasses.fields(Request)
                           if f.name == "max_tokens")
ANSWER_ROOM = 0.1
"""The most of the window a turn keeps free for the answer (``max_tokens`` if
smaller) when it drops old turns to fit."""


@dataclass(frozen=True, slots=True)
class ContextUse:
    tokens: int
    """The conversation so far, rendered with the chat template."""
    window: int
    """The model's context window (``n_ctx``)."""

    @property
    def fraction(self) -> float:
        return self.tokens / self.window


@dataclass(frozen=True, slots=True)
class Dropped:
    """Turns left out so that a new message fits the window."""

    messages: list[dict[str, Any]]
    """The dropped messages, oldest first (the log keeps them)."""
    turns: int
    """How many user messages were among them."""
    tokens: int
    """The prompt's tokens after dropping them."""
    window: int


class ChatSession:
    """Holds the message history; ``send`` streams one answer and logs it.

    A turn cut short (Ctrl-C, a closed stream) is still logged, with finish
    reason "cancelled", and its partial answer stays in the history.
    """

    def __init__(
        self,
        model: Model,
        store: Store | None,
        *,
        system: str | None = None,
        conversation_id: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        options: dict[str, Any] | None = None,
        on_drop: Callable[[Dropped], None] | None = None,
    ) -> None:
        self.model = model
        self.store = store
        self.system = system
        self.options = dict(options or {})
        self.on_drop = on_drop
        """Set: a turn that would overflow the window drops the oldest turns and
        calls this; None: it fails with ContextLengthExceeded."""
        self.messages: list[dict[str, Any]] = list(messages or self._start())
        self.conversation_id = conversation_id or self._new_conversation()

    @classmethod
    def resume(
        cls, model: Model, store: Store, conversation_id: str, **kwargs: Any
    ) -> ChatSession:
        messages = store.conversation_messages(conversation_id)
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        return cls(model, store, system=system, conversation_id=conversation_id,
                   messages=messages, **kwargs)

    def reset(self) -> None:
        """Forget the history (the log keeps it) and start a new conversation."""
        self.messages = self._start()
        self.conversation_id = self._new_conversation()

    def context(self) -> ContextUse:
        """How many tokens of the window the conversation so far takes."""
        tokens = self.count_tokens(self.messages, generation_prompt=False) if self.messages else 0
        return ContextUse(tokens, self.model.backend.n_ctx)

    def count_tokens(self, messages: list[dict[str, Any]], *,
                     generation_prompt: bool = True) -> int:
        """Tokens of ``messages`` rendered as the model will see them."""
        text = self.model.chat_format.render(validate_messages(messages),
                                             add_generation_prompt=generation_prompt)
        return len(self.model.backend.tokenize(text, add_bos=False, special=True))

    def fit(self, messages: list[dict[str, Any]], options: dict[str, Any]
            ) -> list[dict[str, Any]]:
        """``messages`` (ending with the new one) with the oldest whole turns
        dropped until they leave room for the answer; the system prompt and the
        new message always stay. Unchanged without an ``on_drop`` observer."""
        if self.on_drop is None:
            return messages
        window = self.model.backend.n_ctx
        room = min(options.get("max_tokens", _DEFAULT_MAX_TOKENS) or window,
                   int(window * ANSWER_ROOM))
        kept, dropped = list(messages), []
        tokens = self.count_tokens(kept)
        while tokens + room > window:
            start = next(i for i, m in enumerate(kept) if m["role"] != "system")
            end = start + 1  # a turn: the oldest message up to the next user message
            while end < len(kept) - 1 and kept[end]["role"] != "user":
                end += 1
            if end >= len(kept):  # only the new message is left to drop
                break
            dropped += kept[start:end]
            del kept[start:end]
            tokens = self.count_tokens(kept)
        if dropped:
            turns = sum(m["role"] == "user" for m in dropped)
            self.on_drop(Dropped(dropped, turns, tokens, window))
        return kept

    def send(self, text: str, **options: Any) -> Generator[Event, None, None]:
        options = {**self.options, **options}
        messages = self.fit([*self.messages, {"role": "user", "content": text}], options)
        request = self.model.chat_request(messages, **options)
        parts: list[str] = []
        yield from self._run(request, parts, text, messages)
        self.messages = [*messages, {"role": "assistant", "content": "".join(parts)}]

    def complete(self, prompt: str, **options: Any) -> Generator[Event, None, None]:
        """A raw completion (no chat template), logged like a turn."""
        request = self.model.completion_request(prompt, **{**self.options, **options})
        yield from self._run(request, [], prompt, [], raw=True)

    def _run(
        self, request: Request, parts: list[str], text: str,
        messages: list[dict[str, Any]], raw: bool = False,
    ) -> Generator[Event, None, None]:
        start = time.perf_counter()
        first: float | None = None
        finish: Finish | None = None
        n_tokens = 0
        events = self.model.backend.stream(request)
        try:
            for event in events:
                if isinstance(event, TextDelta):
                    first = first or time.perf_counter() - start
                    parts.append(event.text)
                    n_tokens += len(event.tokens)
                else:
                    finish = event
                yield event
        finally:
            events.close()
            if finish is None:  # cut short: keep what was said so far
                self.messages = [*messages, {"role": "assistant", "content": "".join(parts)}]
            self._log(request, text, "".join(parts), messages, finish, raw,
                      n_tokens, first or 0.0, time.perf_counter() - start)

    def _log(
        self, request: Request, prompt: str, response: str, messages: list[dict[str, Any]],
        finish: Finish | None, raw: bool, n_tokens: int, ttft: float, total: float,
    ) -> None:
        if self.store is None:
            return
        fmt = None if raw else self.model.chat_format
        spec, backend = self.model.spec, self.model.backend
        self.store.log(Turn(
            id=None,
            conversation_id=self.conversation_id,
            model=spec.name,
            model_path=str(spec.path),
            model_sha256=self.store.file_sha256(spec.path) if spec.path.exists() else "",
            backend=backend.name,
            backend_version=backend.version,
            chat_format=fmt.name if fmt else "none (raw prompt)",
            chat_format_hash=fmt.template_hash if fmt else "",
            system=self.system,
            prompt=prompt,
            response=response,
            messages=messages,
            sampling={**request.sampling(),
                      **speculation_log(getattr(backend, "speculative", None),
                                        finish.usage if finish else None)},
            seed=request.seed,
            prompt_tokens=finish.usage.prompt_tokens if finish else len(request.prompt),
            completion_tokens=finish.usage.completion_tokens if finish else n_tokens,
            finish_reason=finish.reason if finish else "cancelled",
            ttft_s=finish.timings.ttft_s if finish else ttft,
            total_s=finish.timings.total_s if finish else total,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            model_settings=rope.settings(backend),
            cost=finish.usage.cost if finish else None,
            currency=finish.usage.currency if finish else None,
        ))

    def _start(self) -> list[dict[str, Any]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def _new_conversation(self) -> str:
        """A new conversation's id. Its row is written with its first turn
        (``Store.log`` creates it): no empty conversations in the log, and no
        synced write before a one-shot answer's first token (a commit waits
        for the disk: 20 ms to over a second on the 2-core VM)."""
        if self.store is None:
            return ""
        return new_conversation_id()

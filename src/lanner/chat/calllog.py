"""The model calls behind one answer, logged together.

A tool loop or an inference strategy makes several model calls to produce
one answer. ``CallLog`` makes and records them; ``commit`` logs the
user-facing turn (the final answer, with the token counts and time of all the
calls summed) and then each call as a turn whose ``parent_id`` points at it,
so ``lanner logs`` shows the answer and ``Store.conversation_messages`` keeps
only the answer. The parent is logged first because the Store checks that a
parent exists; the calls therefore get higher ids than their answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from lanner.backends import rope
from lanner.engine.model import Model
from lanner.engine.types import Event, Finish, Request, TextDelta, Timings, Usage
from lanner.store import Store, Turn


@dataclass
class Call:
    """One model call: what was sent, what came back."""

    purpose: str
    """What the call was for ("tool step 1", "draft", "sample 3", ...)."""
    messages: list[dict[str, Any]]
    request: Request
    text: str = ""
    finish: Finish | None = None
    ttft_s: float = 0.0
    total_s: float = 0.0
    n_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.finish.usage.prompt_tokens if self.finish else len(self.request.prompt)

    @property
    def completion_tokens(self) -> int:
        return self.finish.usage.completion_tokens if self.finish else self.n_tokens


@dataclass
class CallLog:
    """Makes model calls for one answer and remembers them (``calls``)."""

    model: Model
    store: Store | None = None
    conversation_id: str | None = None
    """The conversation to log into; a new one is made on commit if None."""
    system: str | None = None
    calls: list[Call] = field(default_factory=list)

    def stream(self, request: Request, messages: list[dict[str, Any]],
               purpose: str) -> Iterator[Event]:
        """Run ``request`` and pass its events on; the call is recorded when
        the stream ends, also when it is cut short (finish reason "cancelled")."""
        call = Call(purpose, messages, request)
        self.calls.append(call)
        start = time.perf_counter()
        events = self.model.backend.stream(request)
        parts: list[str] = []
        try:
            for event in events:
                if isinstance(event, TextDelta):
                    call.ttft_s = call.ttft_s or time.perf_counter() - start
                    parts.append(event.text)
                    call.n_tokens += len(event.tokens)
                else:
                    call.finish = event
                yield event
        finally:
            events.close()
            call.text = "".join(parts)
            call.total_s = time.perf_counter() - start

    def generate(self, request: Request, messages: list[dict[str, Any]], purpose: str) -> Call:
        """Run ``request`` to the end and return the recorded call."""
        for _ in self.stream(request, messages, purpose):
            pass
        return self.calls[-1]

    def usage(self) -> Usage:
        """Tokens of all the calls so far, summed."""
        return Usage(sum(c.prompt_tokens for c in self.calls),
                     sum(c.completion_tokens for c in self.calls))

    def commit(self, prompt: str, response: str, messages: list[dict[str, Any]],
               strategy: str) -> int | None:
        """Log the answer (``prompt`` is the user's text, ``messages`` what the
        user's conversation held) and every call under it. Returns the
        answer's turn id, or None without a store or calls."""
        if self.store is None or not self.calls:
            return None
        if not self.conversation_id:
            self.conversation_id = self.store.new_conversation(self.model.name)
        last = self.calls[-1]
        usage = self.usage()
        parent = self._turn(
            last.request, prompt, response, messages, {"strategy": strategy},
            usage.prompt_tokens, usage.completion_tokens,
            last.finish.reason if last.finish else "cancelled",
            Timings(self.calls[0].ttft_s, sum(c.total_s for c in self.calls)))
        parent_id = self.store.log(parent)
        for call in self.calls:
            child = self._turn(
                call.request, _last_text(call.messages), call.text, call.messages,
                {"strategy": strategy, "step": call.purpose}, call.prompt_tokens,
                call.completion_tokens, call.finish.reason if call.finish else "cancelled",
                Timings(call.ttft_s, call.total_s))
            child.parent_id = parent_id
            self.store.log(child)
        return parent_id

    def _turn(self, request: Request, prompt: str, response: str,
              messages: list[dict[str, Any]], extra: dict[str, object], prompt_tokens: int,
              completion_tokens: int, reason: str, timings: Timings) -> Turn:
        assert self.store is not None and self.conversation_id  # checked by commit
        fmt, spec, backend = self.model.chat_format, self.model.spec, self.model.backend
        return Turn(
            conversation_id=self.conversation_id, model=spec.name, model_path=str(spec.path),
            model_sha256=self.store.file_sha256(spec.path) if spec.path.exists() else "",
            backend=backend.name, backend_version=backend.version, chat_format=fmt.name,
            chat_format_hash=fmt.template_hash, system=self.system, prompt=prompt,
            response=response, messages=messages, sampling={**request.sampling(), **extra},
            seed=request.seed, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, finish_reason=reason,
            ttft_s=timings.ttft_s, total_s=timings.total_s,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            model_settings=rope.settings(backend))


def _last_text(messages: list[dict[str, Any]]) -> str:
    """The content of the last message sent (what this call was asked)."""
    return str(messages[-1].get("content") or "") if messages else ""

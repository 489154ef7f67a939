"""Lanner's ``conversation_id`` extension on chat completions: the answer is
logged as a turn of that conversation, with the same provenance ``lanner chat``
records, so the web UI's chats appear in ``lanner logs`` and can be reopened.

A ``TurnRecorder`` is fed the events of choice 0 and writes the turn once,
when the answer ends or the client leaves (then as "cancelled", with what was
said so far); the write runs on the server's worker pool, never on the event
loop (hashing a model file the first time takes a while).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lanner import paths
from lanner.backends import rope
from lanner.engine.model import Model
from lanner.engine.types import (
    Completion,
    Event,
    Finish,
    Request,
    TextDelta,
    speculation_log,
)
from lanner.server.serving import ServerState
from lanner.store import Store, Turn

log = logging.getLogger("lanner.server")


class TurnRecorder:
    def __init__(self, state: ServerState, conversation_id: str, model: Model,
                 request: Request, messages: list[dict[str, Any]]) -> None:
        self._state = state
        self._conversation_id = conversation_id
        self._model = model
        self._request = request
        self._messages = messages
        self._start = time.perf_counter()
        self._ttft = 0.0
        self._tokens = 0
        self._parts: list[str] = []
        self._finish: Finish | None = None
        self._citations: dict[str, Any] | None = None
        self._closed = False

    def feed(self, index: int, ev: Event) -> None:
        if index != 0:
            return
        if isinstance(ev, TextDelta):
            self._ttft = self._ttft or time.perf_counter() - self._start
            self._parts.append(ev.text)
            self._tokens += len(ev.tokens)
        elif isinstance(ev, Finish):
            self._finish = ev

    def completed(self, result: Completion, text: str | None = None,
                  citations: dict[str, Any] | None = None) -> None:
        """A collected answer (non-streamed routes); ``text`` replaces its text;
        a documents answer's ``citations`` are logged with it."""
        self._parts = [result.text if text is None else text]
        self._citations = citations
        self._tokens = len(result.tokens)
        self._finish = result.finish

    def close(self) -> None:
        """Write the turn (once; later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        turn = self._turn(time.perf_counter() - self._start)
        self._state.executor.submit(_write, self._state.pool.engine.home, turn)

    def _turn(self, total: float) -> Turn:
        finish, request, spec = self._finish, self._request, self._model.spec
        fmt, backend = self._model.chat_format, self._model.backend
        system = next((m["content"] for m in self._messages if m.get("role") == "system"), None)
        return Turn(
            conversation_id=self._conversation_id, model=spec.name,
            model_path=str(spec.path), model_sha256="", backend=backend.name,
            backend_version=backend.version, chat_format=fmt.name,
            chat_format_hash=fmt.template_hash,
            system=system if isinstance(system, str) else None,
            prompt=str(self._messages[-1].get("content") or ""), response="".join(self._parts),
            messages=self._messages, sampling={**request.sampling(),
                      **speculation_log(getattr(backend, "speculative", None),
                                        finish.usage if finish else None)}, seed=request.seed,
            prompt_tokens=finish.usage.prompt_tokens if finish else len(request.prompt),
            completion_tokens=finish.usage.completion_tokens if finish else self._tokens,
            finish_reason=finish.reason if finish else "cancelled", citations=self._citations,
            ttft_s=finish.timings.ttft_s if finish else self._ttft,
            total_s=finish.timings.total_s if finish else total,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            model_settings=rope.settings(backend),
            cost=finish.usage.cost if finish else None,
            currency=finish.usage.currency if finish else None)


def _write(home: Path, turn: Turn) -> None:
    try:
        with Store(paths.db_path(home)) as store:
            path = Path(turn.model_path)
            turn.model_sha256 = store.file_sha256(path) if path.exists() else ""
            store.log(turn)
    except Exception:  # the answer was delivered; a failed log must not break the server
        log.exception("could not log the turn of conversation %s", turn.conversation_id)

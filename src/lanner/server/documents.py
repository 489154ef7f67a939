"""Lanner's extension on chat completions: ``"collection": NAME`` answers the
last user message from that document collection, with every citation checked.

The response is an ordinary ``chat.completion`` whose message content is the
answer with unverified citations marked ``[n?]``, plus a ``citations`` object
(sources with file, page and span; each citation and its check; the queries
retrieval used; for an answer that cites nothing, the best-matching sentences
of the top passages as ``extracted``). Each answer's retrieval queries are
logged at INFO beside uvicorn's lines.

With ``stream: true`` the answer streams as ordinary content deltas (the
model's words as written); the chunk that ends the choice (its
``finish_reason`` set) also carries the ``citations`` object, checked once the
answer is complete, whose ``marked_answer`` is the text with unverified
citations marked ``[n?]``. OpenAI clients keep the unknown field as an extra.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from lanner.engine.engine import Engine
from lanner.engine.model import Model
from lanner.errors import InvalidRequest
from lanner.rag.answer import Answer, Prepared, finish
from lanner.rag.library import Library
from lanner.server import protocol as p

# uvicorn's own logger: `lanner serve` prints its INFO lines.
log = logging.getLogger("uvicorn.error")


class Documents:
    """The server's one Library, opened on first use: the store at ``store``
    (a PostgreSQL store keeps one connection pool for every request), else
    logs.db in the engine's home."""

    def __init__(self, engine: Engine, store: str | None = None) -> None:
        self._home = engine.home
        self._store = store
        self._library: Library | None = None
        self._lock = threading.Lock()

    def library(self) -> Library:
        with self._lock:
            if self._library is None:
                self._library = Library.open(self._store, home=self._home)
            return self._library

    def prepare(self, model: Model, body: p.ChatCompletionRequest,
                options: dict[str, Any]) -> Prepared:
        """Retrieve passages for the last user message (rewritten as a standalone
        query when earlier turns exist) and build what the model is given."""
        check(body)
        messages = p.chat_messages(body)
        question = messages[-1].get("content")
        if messages[-1]["role"] != "user" or not isinstance(question, str) or not question.strip():
            raise InvalidRequest("messages", "with collection, the last message must be the "
                                 "user's question")
        assert body.collection is not None  # the route calls this only with one
        prepared = self.library().prepare(model, question, body.collection,
                                          k=body.passages, history=messages[:-1], **options)
        if prepared.retrieval is not None:
            log.info("Documents %s: %s", body.collection,
                     "; ".join(prepared.retrieval.describe()))
        return prepared

    def close(self) -> None:
        if self._library is not None:
            self._library.close()


def check(body: p.ChatCompletionRequest) -> None:
    """What the extension supports: one answer (whole or streamed) to a user message."""
    if body.tools:
        raise InvalidRequest("collection", "cannot be combined with tools")
    if body.n != 1:
        raise InvalidRequest("collection", "needs n = 1")


def cited(prepared: Prepared, text: str) -> Answer:
    """The model's answer with every citation checked against its passage."""
    return finish(prepared, text)

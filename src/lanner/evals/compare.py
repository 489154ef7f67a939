"""Side by side: one prompt put to several models, every answer streamed and logged.

    comparison = compare(engine, ["smollm2", "tinycoder"], "Explain recursion.", store=store)
    for index, event in comparison.stream():
        ...                      # index: which model this event belongs to
    comparison.answers           # text, finish, log id of each answer

Each answer is a turn of its own conversation, logged by ``ChatSession`` exactly
as ``lanner run`` logs one (a cut-short answer is logged as "cancelled").
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lanner.chat.session import ChatSession
from lanner.engine.engine import Engine
from lanner.engine.model import Model
from lanner.engine.types import Event, Finish, TextDelta
from lanner.errors import InvalidRequest
from lanner.store import Store


@dataclass(slots=True)
class Answer:
    """One model's answer, filled in as its events arrive."""

    model: str
    text: str = ""
    finish: Finish | None = None
    """None while streaming, or when the answer was cut short."""
    log_id: int | None = None
    """The logged turn's id (``Store.turns``); None without a store."""
    conversation_id: str = ""


class Comparison:
    """``prompt`` (after ``history``, under ``system``) for each of ``models``.

    ``options`` are sampling options as for ``Model.chat_request``, the same for
    every model; they are checked here, before any model runs.
    """

    def __init__(
        self, models: Sequence[Model], prompt: str, *, store: Store | None,
        system: str | None = None, history: Sequence[Mapping[str, Any]] = (),
        options: Mapping[str, Any] | None = None,
    ) -> None:
        if not models:
            raise InvalidRequest("models", "give at least one model")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequest("prompt", "must be non-empty text")
        self.models = list(models)
        self.prompt = prompt
        self.store = store
        self.system = system
        self.history = [dict(m) for m in history]
        self.options = dict(options or {})
        self.answers = [Answer(model.name) for model in self.models]
        for model in self.models:  # a bad option or a prompt too long fails before any runs
            model.chat_request([*self._start(), {"role": "user", "content": prompt}],
                               **self.options)

    def stream(self) -> Generator[tuple[int, Event], None, None]:
        """``(model index, event)`` for every event of every answer.

        One model after the other, not interleaved: llama.cpp decodes every
        context of the process on one shared thread and the other backends
        share the same cores, so interleaving would finish no sooner, only make
        each answer's logged speed (ttft_s, total_s) depend on its neighbours.
        """
        for index, model in enumerate(self.models):
            yield from self._one(index, model)

    def run(self) -> list[Answer]:
        """Every answer, whole."""
        for _ in self.stream():
            pass
        return self.answers

    def _one(self, index: int, model: Model) -> Generator[tuple[int, Event], None, None]:
        answer = self.answers[index]
        session = ChatSession(model, self.store, system=self.system, options=self.options,
                              messages=self._start() or None)
        answer.conversation_id = session.conversation_id
        events = session.send(self.prompt)
        try:
            for event in events:
                if isinstance(event, TextDelta):
                    answer.text += event.text
                elif isinstance(event, Finish):
                    answer.finish = event
                yield index, event
        finally:
            events.close()  # logs the turn now, also when the caller stops early
            answer.log_id = _logged_id(self.store, session.conversation_id)

    def _start(self) -> list[dict[str, Any]]:
        """The messages before the prompt: system, then the history."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history]


def compare(
    engine: Engine, names: Sequence[str], prompt: str, *, store: Store | None,
    system: str | None = None, load_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> Comparison:
    """Load ``names`` (at least two) through ``engine`` and set up the comparison;
    iterate ``.stream()`` or call ``.run()``. ``load_options`` go to ``Engine.load``."""
    check_names(names, least=2, what="compare")
    models = [engine.load(name, **dict(load_options or {})) for name in names]
    return Comparison(models, prompt, store=store, system=system, options=options)


def check_names(names: Sequence[str], *, least: int, what: str) -> None:
    """At least ``least`` model names, none empty; ``InvalidRequest`` naming ``models``."""
    count = 1 if isinstance(names, str) else len(names)  # a lone name passed as text
    if isinstance(names, str) or count < least:
        raise InvalidRequest("models", f"{what} needs at least {least} models, got {count}")
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise InvalidRequest("models", "model names must be non-empty text")


def _logged_id(store: Store | None, conversation_id: str) -> int | None:
    """The id of the turn just logged in this answer's own conversation."""
    if store is None:
        return None
    turns = store.turns(limit=1, conversation_id=conversation_id)
    return turns[-1].id if turns else None

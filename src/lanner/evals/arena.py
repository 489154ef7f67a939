"""The blind arena: two models answer one prompt as "A" and "B", a person votes
without knowing which is which, and the votes become Bradley-Terry ratings.

    arena = Arena([engine.load("smollm2"), engine.load("tinycoder")], store, seed=1)
    battle = arena.battle("Write a haiku about tea.")
    for index, event in battle.stream():   # index 0 is A, 1 is B
        ...
    arena.vote(battle.record.id, "a")      # "a", "b", "tie" or "both_bad"; reveals the names
    arena.ratings()

Both answers are logged turns (like ``lanner run``); a battle is saved, unvoted,
once both answers are complete, so an interrupted battle leaves no half record.
"""

from __future__ import annotations

import random
from collections.abc import Generator, Mapping, Sequence
from typing import Any

from lanner.engine.engine import Engine
from lanner.engine.model import Model
from lanner.engine.types import Event
from lanner.errors import InvalidRequest
from lanner.evals.arena_store import ArenaStore, BattleRecord
from lanner.evals.compare import Comparison, check_names
from lanner.evals.ratings import Rating, fit
from lanner.store import Store

LABELS = ("A", "B")


def pick_pair(names: Sequence[str], rng: random.Random) -> tuple[str, str]:
    """Two different models of ``names``, in random order (A first)."""
    check_names(names, least=2, what="the arena")
    distinct = list(dict.fromkeys(names))
    if len(distinct) < len(names):
        twice = next(n for n in distinct if list(names).count(n) > 1)
        raise InvalidRequest("models", f"{twice!r} is given twice; a model cannot battle itself")
    a, b = rng.sample(distinct, 2)
    return a, b


class Battle:
    """Model A and model B answer ``prompt``; ``record`` is the saved battle
    (None until both answers are complete)."""

    def __init__(
        self, arena: ArenaStore, models: tuple[Model, Model], prompt: str, *,
        system: str | None = None, options: Mapping[str, Any] | None = None,
    ) -> None:
        if models[0].name == models[1].name:
            raise InvalidRequest("models", f"{models[0].name!r} cannot battle itself")
        self.arena = arena
        self.comparison = Comparison(models, prompt, store=arena.store, system=system,
                                     options=options)
        self.record: BattleRecord | None = None

    def stream(self) -> Generator[tuple[int, Event], None, None]:
        """``(0 for A or 1 for B, event)``; saves the battle after the last one."""
        yield from self.comparison.stream()
        a, b = self.comparison.answers
        self.record = self.arena.add(
            prompt=self.comparison.prompt, system=self.comparison.system,
            model_a=a.model, model_b=b.model, answer_a=a.text, answer_b=b.text,
            response_a=a.log_id, response_b=b.log_id)

    def run(self) -> BattleRecord:
        """Both answers, whole, and the saved (unvoted) battle."""
        for _ in self.stream():
            pass
        if self.record is None:  # pragma: no cover - stream() always sets it
            raise RuntimeError("the battle was not saved")
        return self.record


class Arena:
    """Battles between ``models`` (two or more, loaded), saved in ``store``.

    ``seed`` makes the choice of pairs and their order repeatable."""

    def __init__(self, models: Sequence[Model], store: Store, *, seed: int | None = None
                 ) -> None:
        self.models = {m.name: m for m in models}
        pick_pair([m.name for m in models], random.Random(0))  # checks the names
        self.store = ArenaStore(store)
        self._rng = random.Random(seed)

    def battle(self, prompt: str, *, system: str | None = None, **options: Any) -> Battle:
        """A new battle between two of the models (not yet run)."""
        a, b = pick_pair(list(self.models), self._rng)
        return Battle(self.store, (self.models[a], self.models[b]), prompt,
                      system=system, options=options)

    def vote(self, battle_id: str, winner: str) -> BattleRecord:
        """Record "a", "b", "tie" or "both_bad" once; the record names both models."""
        return self.store.vote(battle_id, winner)

    def ratings(self, *, rounds: int = 1000, seed: int = 0) -> list[Rating]:
        """Ratings of this arena's models from every stored vote between them."""
        return ratings(self.store, list(self.models), rounds=rounds, seed=seed)


def open_arena(engine: Engine, names: Sequence[str], store: Store, *, seed: int | None = None,
               **load_options: Any) -> Arena:
    """An Arena over ``names``, loaded through ``engine`` (``Engine.load`` options)."""
    pick_pair(names, random.Random(0))  # bad names fail before any model loads
    return Arena([engine.load(name, **load_options) for name in names], store, seed=seed)


def ratings(arena: ArenaStore, models: Sequence[str] | None = None, *, rounds: int = 1000,
            seed: int = 0) -> list[Rating]:
    """Bradley-Terry ratings from the stored votes (see ``evals.ratings.fit``)."""
    return fit(arena.votes(), models, rounds=rounds, seed=seed)

"""Arena battles and their votes in the Store (schema: ``store/migrations/0004_arena.sql``).

A battle is saved once both answers are in, without a vote; ``vote`` fills the
vote in exactly once. Votes are read back for the ratings (``evals.ratings``).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, fields

from lanner.errors import AlreadyVoted, BattleNotFound
from lanner.evals.ratings import Winner, check_winner
from lanner.store import Store, new_conversation_id, utc_now


@dataclass(frozen=True, slots=True)
class BattleRecord:
    """One battle as stored: what was asked, who answered as A and B, the vote."""

    id: str
    prompt: str
    system: str | None
    model_a: str
    """The model whose answer was shown as A."""
    model_b: str
    answer_a: str
    answer_b: str
    response_a: int | None
    """The logged turn of answer A (``Store.turns``)."""
    response_b: int | None
    created_at: str
    winner: Winner | None = None
    """None until voted."""
    voted_at: str | None = None


_COLUMNS = tuple(f.name for f in fields(BattleRecord))


class ArenaStore:
    """Battles in ``store``'s database, through the Store's own locked
    transactions (store/transactions.py): a battle and the turns it points to
    are written on one connection."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, *, prompt: str, system: str | None, model_a: str, model_b: str,
            answer_a: str, answer_b: str, response_a: int | None,
            response_b: int | None) -> BattleRecord:
        """Save a battle without a vote; its id is time-sortable hex."""
        record = BattleRecord(
            id=new_conversation_id(), prompt=prompt, system=system, model_a=model_a,
            model_b=model_b, answer_a=answer_a, answer_b=answer_b, response_a=response_a,
            response_b=response_b, created_at=utc_now())
        marks = ", ".join("?" * len(_COLUMNS))
        with self.store._write() as conn:
            conn.execute(f"INSERT INTO arena_battles ({', '.join(_COLUMNS)}) VALUES ({marks})",
                         tuple(getattr(record, c) for c in _COLUMNS))
        return record

    def get(self, battle_id: str) -> BattleRecord:
        """The battle; ``BattleNotFound`` if there is none by that id."""
        with self.store._read() as conn:
            row = conn.execute(f"{_SELECT} WHERE id = ?", (battle_id,)).fetchone()
        if row is None:
            raise BattleNotFound(f"no arena battle {battle_id!r}")
        return _record(row)

    def vote(self, battle_id: str, winner: str) -> BattleRecord:
        """Record the vote ("a", "b", "tie" or "both_bad") and return the battle
        with it. ``InvalidRequest`` for another winner, ``BattleNotFound``,
        ``AlreadyVoted`` if it has a vote (the first one stands)."""
        check_winner(winner)
        with self.store._write() as conn:
            done = conn.execute(
                "UPDATE arena_battles SET winner = ?, voted_at = ? WHERE id = ? AND winner IS NULL",
                (winner, utc_now(), battle_id))
            if done.rowcount == 0:
                row = conn.execute("SELECT winner FROM arena_battles WHERE id = ?",
                                   (battle_id,)).fetchone()
                if row is None:
                    raise BattleNotFound(f"no arena battle {battle_id!r}")
                raise AlreadyVoted(f"battle {battle_id} already has a vote ({row[0]})")
        return self.get(battle_id)

    def votes(self) -> list[BattleRecord]:
        """Every voted battle, oldest vote first."""
        with self.store._read() as conn:
            rows = conn.execute(f"{_SELECT} WHERE winner IS NOT NULL ORDER BY voted_at, id")
            return [_record(row) for row in rows.fetchall()]


_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM arena_battles"


def _record(row: sqlite3.Row) -> BattleRecord:
    # The table's CHECK keeps winner to WINNERS or NULL.
    return BattleRecord(**{c: row[c] for c in _COLUMNS})

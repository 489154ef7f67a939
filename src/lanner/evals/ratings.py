"""Bradley-Terry ratings from pairwise votes, on an Elo-like scale, with
bootstrap confidence intervals.

The model: each model ``i`` has a strength ``p_i`` and wins against ``j`` with
probability ``p_i / (p_i + p_j)``. Strengths are fitted by Hunter's (2004) MM
algorithm and reported as ``1000 + 400 * log10(p_i)`` with the mean rating
anchored at 1000, so 400 points apart means 10:1 odds.

Votes are "a" (A won), "b" (B won), "tie" or "both_bad". A tie counts as half a
win for each side. "both_bad" is stored apart (it says something about the
prompt, not only the pair) but counts as a tie for the ratings.

A weak prior of ``prior_ties`` virtual ties between every pair of models keeps
every rating finite when a model has won (or lost) all its votes; with a few
hundred votes per pair its pull is negligible.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from lanner.errors import InvalidRequest

Winner = Literal["a", "b", "tie", "both_bad"]
WINNERS: tuple[Winner, ...] = ("a", "b", "tie", "both_bad")

SCALE = 400.0 / np.log(10.0)
"""Rating points per unit of natural log-strength (Elo's 400 * log10)."""
ANCHOR = 1000.0
"""The mean rating."""


class PairVote(Protocol):
    """One vote between two models (an arena vote is one)."""

    @property
    def model_a(self) -> str: ...

    @property
    def model_b(self) -> str: ...

    @property
    def winner(self) -> str | None:
        """One of ``WINNERS``; None (not voted) is an error here."""
        ...


@dataclass(frozen=True, slots=True)
class Vote:
    """A plain PairVote, for votes that do not come from the arena's table."""

    model_a: str
    model_b: str
    winner: Winner


@dataclass(frozen=True, slots=True)
class Rating:
    model: str
    rating: float
    low: float
    """2.5th percentile of the bootstrap ratings."""
    high: float
    """97.5th percentile of the bootstrap ratings."""
    wins: int
    losses: int
    ties: int
    """Ties and both-bad votes together (both count as a tie)."""
    both_bad: int
    votes: int


def fit(
    votes: Iterable[PairVote],
    models: Sequence[str] | None = None,
    *,
    rounds: int = 1000,
    seed: int = 0,
    prior_ties: float = 1.0,
) -> list[Rating]:
    """Ratings of ``models`` (default: every model in ``votes``) from the votes
    between them, best first.

    ``rounds`` bootstrap resamples of the votes (drawn with replacement, seeded
    by ``seed``) give each rating's 95% interval; ``rounds=0`` skips them (the
    interval is then the rating itself). Raises ``InvalidRequest`` for no votes,
    a listed model with no votes, a bad winner, a model voted against itself,
    or models never compared with each other, directly or through others.
    """
    names, pairs = _models(list(votes), models)
    if rounds < 0:
        raise InvalidRequest("rounds", f"must be 0 or more, got {rounds}")
    if not prior_ties > 0:  # without it a model that never won has no finite rating
        raise InvalidRequest("prior_ties", f"must be more than 0, got {prior_ties}")
    index = {name: i for i, name in enumerate(names)}
    kinds: dict[tuple[int, int, float], int] = {}  # (a, b, A's score) -> how many votes
    for v in pairs:
        key = (index[v.model_a], index[v.model_b], _score(v.winner))
        kinds[key] = kinds.get(key, 0) + 1
    _check_connected(names, list(kinds))
    to_wins = _win_matrix(list(kinds), len(names))
    counts = np.array(list(kinds.values()), dtype=float)
    ratings = _ratings(counts[None, :] @ to_wins, len(names), prior_ties)[0]
    low, high = ratings, ratings
    if rounds:
        # Drawing len(pairs) votes with replacement is one multinomial draw over
        # the distinct kinds of vote: the same distribution, without a loop.
        rng = np.random.default_rng(seed)
        resampled = rng.multinomial(len(pairs), counts / counts.sum(), size=rounds)
        boot = _ratings(resampled @ to_wins, len(names), prior_ties)
        low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    out = [_rating(name, i, ratings, low, high, pairs) for i, name in enumerate(names)]
    return sorted(out, key=lambda r: -r.rating)


def _models(pairs: list[PairVote], models: Sequence[str] | None,
            ) -> tuple[list[str], list[PairVote]]:
    """The models to rate and the votes between them."""
    if not pairs:
        raise InvalidRequest("votes", "there are no votes to rate yet")
    for v in pairs:
        if v.model_a == v.model_b:
            raise InvalidRequest("votes", f"a vote of {v.model_a!r} against itself")
    if models is None:
        return sorted({m for v in pairs for m in (v.model_a, v.model_b)}), pairs
    names = list(dict.fromkeys(models))
    pairs = [v for v in pairs if v.model_a in names and v.model_b in names]
    voted = {m for v in pairs for m in (v.model_a, v.model_b)}
    for name in names:
        if name not in voted:
            raise InvalidRequest("models", f"{name!r} has no votes against the other models")
    return names, pairs


def check_winner(winner: object) -> Winner:
    """``winner`` itself if it is one of ``WINNERS``; ``InvalidRequest`` otherwise."""
    for known in WINNERS:
        if winner == known:
            return known
    raise InvalidRequest("winner", f"must be one of {', '.join(WINNERS)}, got {winner!r}")


def _score(winner: str | None) -> float:
    """A's share of the win: 1, 0, or a half for a tie (both_bad is a tie)."""
    return {"a": 1.0, "b": 0.0}.get(check_winner(winner), 0.5)


def _check_connected(names: list[str], kinds: list[tuple[int, int, float]]) -> None:
    """Every model must be linked to every other by a chain of votes, or their
    ratings have no common scale (only the prior would relate them)."""
    seen, frontier = {0}, [0]
    while frontier:
        i = frontier.pop()
        for x, y, _ in kinds:
            j = y if x == i else x if y == i else None
            if j is not None and j not in seen:
                seen.add(j)
                frontier.append(j)
    if len(seen) < len(names):
        lone = next(n for i, n in enumerate(names) if i not in seen)
        raise InvalidRequest("votes", f"{names[0]!r} and {lone!r} were never compared, "
                             "directly or through other models; their ratings cannot be "
                             "put on one scale")


def _win_matrix(kinds: list[tuple[int, int, float]], k: int) -> np.ndarray:
    """(G, k*k): one vote of kind g adds row g to the flattened wins[i, j]
    (how often i beat j; a tie is half a win each way)."""
    matrix = np.zeros((len(kinds), k * k))
    for g, (a, b, score) in enumerate(kinds):
        matrix[g, a * k + b] += score
        matrix[g, b * k + a] += 1.0 - score
    return matrix


def _ratings(flat_wins: np.ndarray, k: int, prior_ties: float, tol: float = 1e-10,
             max_iter: int = 100_000) -> np.ndarray:
    """(R, k) ratings from (R, k*k) win counts: MM updates, all resamples at once.

    p_i <- W_i / sum_j n_ij / (p_i + p_j), where W_i is i's total wins and n_ij
    the games between i and j; each step raises the likelihood."""
    wins = flat_wins.reshape(-1, k, k) + prior_ties / 2.0 * (1.0 - np.eye(k))
    games = wins + wins.transpose(0, 2, 1)  # n_ij, (R, k, k)
    total = wins.sum(axis=2)  # W_i, (R, k)
    log_p = np.zeros_like(total)
    for _ in range(max_iter):
        p = np.exp(log_p)
        denom = (games / (p[:, :, None] + p[:, None, :])).sum(axis=2)
        new = np.log(total) - np.log(denom)
        new -= new.mean(axis=1, keepdims=True)  # geometric mean strength 1
        step = np.max(np.abs(new - log_p))
        log_p = new
        if step < tol:
            break
    return ANCHOR + SCALE * log_p


def _rating(name: str, i: int, ratings: np.ndarray, low: np.ndarray, high: np.ndarray,
            pairs: list[PairVote]) -> Rating:
    mine = [v for v in pairs if name in (v.model_a, v.model_b)]
    won = sum((v.winner == "a" and v.model_a == name) or (v.winner == "b" and v.model_b == name)
              for v in mine)
    ties = sum(v.winner in ("tie", "both_bad") for v in mine)
    return Rating(model=name, rating=float(ratings[i]), low=float(low[i]), high=float(high[i]),
                  wins=won, losses=len(mine) - won - ties, ties=ties,
                  both_bad=sum(v.winner == "both_bad" for v in mine), votes=len(mine))

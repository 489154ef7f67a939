"""Bradley-Terry ratings: recovered from votes simulated with known strengths,
ties as half a win, bootstrap intervals, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest

from lanner.errors import InvalidRequest
from lanner.evals.ratings import ANCHOR, SCALE, Vote, fit

NAMES = ["w", "x", "y", "z"]
LOG_STRENGTH = np.array([0.0, 0.5, 1.0, 2.0])


def simulate(n: int, seed: int) -> list[Vote]:
    """``n`` votes between random pairs; i beats j with probability
    exp(s_i) / (exp(s_i) + exp(s_j)) (the Bradley-Terry model itself)."""
    rng = np.random.default_rng(seed)
    votes = []
    for _ in range(n):
        i, j = rng.choice(len(NAMES), size=2, replace=False)
        p_i = 1.0 / (1.0 + np.exp(LOG_STRENGTH[j] - LOG_STRENGTH[i]))
        votes.append(Vote(NAMES[i], NAMES[j], "a" if rng.random() < p_i else "b"))
    return votes


def test_ratings_recover_known_strengths_inside_their_intervals() -> None:
    table = {r.model: r for r in fit(simulate(4000, seed=7), rounds=500, seed=1)}
    true = ANCHOR + SCALE * (LOG_STRENGTH - LOG_STRENGTH.mean())  # mean 1000, 400*log10 odds
    assert [r.model for r in fit(simulate(4000, seed=7), rounds=0)] == ["z", "y", "x", "w"]
    fitted = np.array([table[n].rating for n in NAMES])
    assert fitted.mean() == pytest.approx(ANCHOR)
    # Differences in log-strength come back within 0.1 (17 rating points).
    assert np.abs(np.diff(fitted) / SCALE - np.diff(LOG_STRENGTH)).max() < 0.1
    for name, value in zip(NAMES, true, strict=True):
        r = table[name]
        assert r.low < r.rating < r.high
        assert r.low <= value <= r.high, (name, value, r)
        assert r.high - r.low < 60  # a few thousand votes pin a rating to tens of points
    assert sum(r.votes for r in table.values()) == 2 * 4000


def test_bootstrap_is_seeded() -> None:
    votes = simulate(300, seed=3)
    assert fit(votes, rounds=100, seed=5) == fit(votes, rounds=100, seed=5)
    assert fit(votes, rounds=100, seed=5) != fit(votes, rounds=100, seed=6)


def test_a_tie_is_half_a_win_each_and_both_bad_counts_as_a_tie() -> None:
    with_ties = fit([Vote("p", "q", "a"), Vote("p", "q", "tie"), Vote("q", "p", "tie")], rounds=0)
    same_score = fit([Vote("p", "q", "a"), Vote("p", "q", "a"), Vote("q", "p", "a")], rounds=0)
    both_bad = fit([Vote("p", "q", "a"), Vote("p", "q", "both_bad"), Vote("q", "p", "both_bad")],
                   rounds=0)
    assert [r.rating for r in with_ties] == pytest.approx([r.rating for r in same_score])
    assert [r.rating for r in both_bad] == pytest.approx([r.rating for r in with_ties])
    p, q = both_bad
    assert (p.model, p.wins, p.losses, p.ties, p.both_bad, p.votes) == ("p", 1, 0, 2, 2, 3)
    assert (q.model, q.wins, q.losses, q.ties, q.both_bad, q.votes) == ("q", 0, 1, 2, 2, 3)
    even = fit([Vote("p", "q", "tie")] * 5, rounds=0)
    assert even[0].rating == pytest.approx(ANCHOR) and even[1].rating == pytest.approx(ANCHOR)


def test_a_model_that_won_every_vote_has_a_finite_rating() -> None:
    table = fit([Vote("p", "q", "a")] * 20 + [Vote("q", "r", "a")] * 3, rounds=50)
    assert [r.model for r in table] == ["p", "q", "r"]
    assert all(np.isfinite([r.rating, r.low, r.high]).all() for r in table)


def test_rating_a_subset_uses_only_the_votes_between_them() -> None:
    votes = [Vote("p", "q", "a"), Vote("q", "p", "b"), Vote("p", "r", "b")]
    table = fit(votes, ["p", "q"], rounds=0)
    assert [(r.model, r.votes) for r in table] == [("p", 2), ("q", 2)]


@pytest.mark.parametrize(
    ("votes", "models", "words"),
    [
        ([], None, ("votes", "no votes")),
        ([Vote("p", "q", "a")], ["p", "q", "r"], ("models", "'r' has no votes")),
        ([Vote("p", "q", "c")], None, ("winner", "a, b, tie, both_bad", "'c'")),  # type: ignore[arg-type]
        ([Vote("p", "p", "a")], None, ("votes", "against itself")),
        ([Vote("p", "q", "a"), Vote("r", "s", "a")], None, ("never compared", "'p'", "'r'")),
    ],
)
def test_bad_votes_are_clear_errors(votes: list[Vote], models: list[str] | None,
                                    words: tuple[str, ...]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        fit(votes, models, rounds=0)
    for word in words:
        assert word in str(caught.value)


def test_bad_options_name_themselves() -> None:
    votes = [Vote("p", "q", "a")]
    with pytest.raises(InvalidRequest, match="rounds"):
        fit(votes, rounds=-1)
    with pytest.raises(InvalidRequest, match="prior_ties"):
        fit(votes, prior_ties=0)

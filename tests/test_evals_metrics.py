"""Scores and aggregation against lm-evaluation-harness's own functions."""

from __future__ import annotations

import math
import random

import pytest

from lanner.evals import metrics, runner
from lanner.evals.prompts import Item
from lanner.evals.taskfile import Filter, FilterStep, Metric


@pytest.mark.parametrize("options", [
    {},
    {"ignore_case": True},
    {"ignore_case": True, "ignore_punctuation": True},
    {"regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"], "ignore_case": True},
    {"ignore_numbers": True},
])
def test_exact_match_equals_lm_evals(options: dict) -> None:
    from lm_eval.api.metrics import exact_match_hf_evaluate

    pairs = [("The answer is 42.", "the answer is 42"), ("#### 1,234", "1234"), ("$5", "5"),
             ("Paris", "paris"), ("x 12 y", "x 13 y"), ("", "")]
    for prediction, reference in pairs:
        expected = exact_match_hf_evaluate([prediction], [reference], **options)["exact_match"]
        assert metrics.exact_match(prediction, reference, **options) == expected


def test_regex_filter_equals_lm_evals() -> None:
    from lm_eval.filters.extraction import RegexFilter

    cases = [
        ({"regex_pattern": "#### (\\-?[0-9\\.\\,]+)"}, "so #### 1,234 done"),
        ({"regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)", "group_select": -1}, "3 then 45 and 6"),
        ({"regex_pattern": "(-?[0-9]+)"}, "no number here"),
        ({"regex_pattern": "The answer is (\\-?[0-9\\.\\,]+).", "fallback": "x"},
         "The answer is 8."),
    ]
    for options, text in cases:
        expected = list(RegexFilter(**options).apply([[text]], [{}]))[0][0]
        assert metrics.apply_filter(Filter("f", (FilterStep("regex", options),)), text) == expected


def test_rolling_windows_equal_lm_evals() -> None:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    rng = random.Random(0)
    for n, max_len in [(5, 8), (8, 8), (9, 8), (40, 8), (100, 7), (1, 3)]:
        tokens = [rng.randrange(100) for _ in range(n)]
        expected = [make_disjoint_window(w) for w in
                    get_rolling_token_windows(tokens, prefix_token=-1, max_seq_len=max_len,
                                              context_len=1)]
        assert list(runner.rolling_windows(tokens, -1, max_len)) == expected


def test_choice_scores_follow_lm_evals_normalisation() -> None:
    item = Item(0, {}, "Q", [" a", " bbbbbbbb"], 1)
    # Choice 0 has the higher total; per character, choice 1 wins.
    lls = [(-2.0, True), (-3.0, False)]
    scores = metrics.score_choices(item, lls, [Metric("acc"), Metric("acc_norm"),
                                               Metric("exact_match")])
    assert scores == {"acc,none": 0.0, "acc_norm,none": 1.0, "exact_match,none": 0.0}


def test_aggregates_with_standard_errors() -> None:
    from lm_eval.api.metrics import bits_per_byte, mean_stderr, weighted_perplexity

    accs = [{"acc,none": v} for v in (1.0, 0.0, 1.0, 1.0)]
    agg = metrics.aggregate(accs)["acc,none"]
    assert agg.value == 0.75
    assert agg.stderr == pytest.approx(mean_stderr([1.0, 0.0, 1.0, 1.0]))
    pairs = [(-10.0, 4.0), (-3.5, 2.0)]
    rolling = metrics.aggregate([{"word_perplexity,none": list(p), "bits_per_byte,none": list(p)}
                                 for p in pairs])
    assert rolling["word_perplexity,none"].value == pytest.approx(weighted_perplexity(pairs))
    assert rolling["bits_per_byte,none"].value == pytest.approx(bits_per_byte(pairs))
    assert rolling["bits_per_byte,none"].stderr is None
    assert math.isclose(metrics.aggregate([{"perplexity,none": -1.0}])["perplexity,none"].value,
                        math.e)

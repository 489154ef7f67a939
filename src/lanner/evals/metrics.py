"""Scores as lm-evaluation-harness computes them: per item, then aggregated.

Score keys are lm-eval's ``"metric,filter"`` (``"acc,none"``,
``"exact_match,strict-match"``) so a run reads side by side with lm-eval's
output. Metrics outside lm-eval's built-ins come from ``ITEM_METRICS``: a
function ``(prediction, doc, *, task_dir, **options) -> float``, imported
only when a task names it.
"""

from __future__ import annotations

import importlib
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lanner.errors import TaskError
from lanner.evals.prompts import Item
from lanner.evals.taskfile import Filter, Metric, TaskSpec

ITEM_METRICS: dict[str, str] = {
    "pass@1": "lanner.evals.humaneval:pass_at_1",
    "sql_execution": "lanner.evals.sqlexec:execution_accuracy",
}
_BUILTIN = {
    "multiple_choice": {"acc", "acc_norm", "acc_bytes", "exact_match"},
    "generate_until": {"exact_match"},
    "loglikelihood": {"perplexity", "acc"},
    "loglikelihood_rolling": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
}
_FILTERS = {"regex", "take_first", "remove_whitespace", "lowercase", "uppercase"}
# Aggregations other than the mean; their items are (loglikelihood, weight) pairs.
_WEIGHTED = {"word_perplexity", "byte_perplexity", "bits_per_byte"}
LOWER_IS_BETTER = _WEIGHTED | {"perplexity"}


def check(spec: TaskSpec) -> None:
    """Fail before any model work if the task names a metric or filter Lanner lacks."""
    known = _BUILTIN[spec.output_type]
    for metric in spec.metrics:
        if metric.name not in known and metric.name not in ITEM_METRICS:
            names = ", ".join(sorted(known | set(ITEM_METRICS)))
            raise TaskError(f"{spec.path}: metric {metric.name!r} is not supported for "
                            f"{spec.output_type} (known: {names})")
        if metric.name in ITEM_METRICS and spec.output_type != "generate_until":
            raise TaskError(f"{spec.path}: metric {metric.name!r} scores generated text: "
                            "it needs output_type generate_until")
    for pipeline in spec.filters:
        for step in pipeline.steps:
            if step.function not in _FILTERS:
                raise TaskError(f"{spec.path}: filter {pipeline.name!r}: function "
                                f"{step.function!r} is not supported "
                                f"({', '.join(sorted(_FILTERS))})")


# -- filters -------------------------------------------------------------------


def apply_filter(pipeline: Filter, text: str) -> str:
    """One generated answer through one ``filter_list`` pipeline."""
    for step in pipeline.steps:
        if step.function == "regex":
            text = _regex(text, **step.options)
        elif step.function == "remove_whitespace":
            text = text.strip()
        elif step.function == "lowercase":
            text = text.lower()
        elif step.function == "uppercase":
            text = text.upper()
        # take_first: one response per item already
    return text


def _regex(text: str, regex_pattern: str = r"#### (\-?[0-9\.\,]+)", group_select: int = 0,
           fallback: str = "[invalid]") -> str:
    found = re.findall(regex_pattern, text)
    if not found:
        return fallback
    match = found[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return str(match).strip()


# -- per-item scores -----------------------------------------------------------


def exact_match(prediction: str, reference: str, *, regexes_to_ignore: Sequence[str] = (),
                ignore_case: bool = False, ignore_punctuation: bool = False,
                ignore_numbers: bool = False) -> float:
    """lm-eval's ``exact_match`` (HF evaluate's rules, in this order)."""
    for pattern in regexes_to_ignore or ():
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    if ignore_numbers:
        table = str.maketrans("", "", string.digits)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def score_choices(item: Item, lls: Sequence[tuple[float, bool]], metrics: Sequence[Metric]
                  ) -> dict[str, float]:
    """acc (highest loglikelihood), acc_norm (per character), acc_bytes (per UTF-8
    byte) and exact_match (the gold continuation is the greedy one)."""
    assert item.choices is not None
    values = np.array([ll for ll, _ in lls])
    chars = np.array([float(len(c)) for c in item.choices])
    nbytes = np.array([float(len(c.encode("utf-8"))) for c in item.choices])
    gold = item.gold if isinstance(item.gold, list) else [item.gold]

    def hit(pred: int) -> float:
        return float(pred in gold)

    table = {
        "acc": hit(int(np.argmax(values))),
        "acc_norm": hit(int(np.argmax(values / chars))),
        "acc_bytes": hit(int(np.argmax(values / nbytes))),
        "exact_match": float(any(g != -100 and lls[g][1] for g in gold)),
    }
    return {f"{m.name},none": table[m.name] for m in metrics}


def score_generation(
    item: Item, text: str, spec: TaskSpec
) -> tuple[dict[str, float], dict[str, str]]:
    """Every metric under every filter; also the filtered answers."""
    scores: dict[str, float] = {}
    filtered: dict[str, str] = {}
    golds = item.gold if isinstance(item.gold, list) else [item.gold]
    for pipeline in spec.filters:
        answer = apply_filter(pipeline, text)
        filtered[pipeline.name] = answer
        for metric in spec.metrics:
            fn = _item_metric(metric)
            scores[f"{metric.name},{pipeline.name}"] = max(
                fn(answer, item.doc, str(g), spec) for g in golds
            )
    return scores, filtered


def _item_metric(metric: Metric) -> Callable[[str, Any, str, TaskSpec], float]:
    if metric.name == "exact_match":
        return lambda answer, doc, gold, spec: exact_match(answer, gold, **metric.options)
    module_name, _, name = ITEM_METRICS[metric.name].partition(":")
    fn = getattr(importlib.import_module(module_name), name)
    return lambda answer, doc, gold, spec: float(fn(answer, doc, task_dir=spec.folder,
                                                    **metric.options))


def score_rolling(text: str, ll: float, metrics: Sequence[Metric]) -> dict[str, list[float]]:
    """(loglikelihood, weight) per item; words are split on whitespace as lm-eval does."""
    words = float(len(re.split(r"\s+", text)))
    nbytes = float(len(text.encode("utf-8")))
    table = {"word_perplexity": [ll, words], "byte_perplexity": [ll, nbytes],
             "bits_per_byte": [ll, nbytes]}
    return {f"{m.name},none": table[m.name] for m in metrics}


def score_loglikelihood(ll: float, greedy: bool, metrics: Sequence[Metric]) -> dict[str, float]:
    table = {"perplexity": ll, "acc": float(greedy)}
    return {f"{m.name},none": table[m.name] for m in metrics}


# -- aggregation ---------------------------------------------------------------


@dataclass(frozen=True)
class Aggregate:
    value: float
    stderr: float | None
    """Standard error of the mean (sample standard deviation / sqrt(n))."""
    n: int


def aggregate(per_item: Sequence[dict[str, Any]]) -> dict[str, Aggregate]:
    """Each score key over all items, as lm-eval aggregates it."""
    out: dict[str, Aggregate] = {}
    for key in per_item[0] if per_item else ():
        name = key.split(",")[0]
        values = [scores[key] for scores in per_item]
        if name in _WEIGHTED:
            ll = sum(v[0] for v in values)
            weight = sum(v[1] for v in values)
            per_unit = -ll / weight
            value = per_unit / math.log(2) if name == "bits_per_byte" else math.exp(per_unit)
            out[key] = Aggregate(value, None, len(values))
        elif name == "perplexity":
            out[key] = Aggregate(math.exp(-float(np.mean(values))), None, len(values))
        else:
            arr = np.asarray(values, dtype=float)
            stderr = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else None
            out[key] = Aggregate(float(arr.mean()), stderr, len(arr))
    return out

"""Inference strategies: several model calls for one better answer.

- ``show-work``: a maths or reasoning question (``looks_like_reasoning``) is
  asked again with a request for worked steps ending in "Answer: ..."; the
  final answer is extracted (``extract_answer``). Other questions go through
  as they are.
- ``self-consistency``: ``n`` sampled worked solutions; the answer most of
  them reach wins (majority vote on the normalised answer, earliest on a tie).
- ``check-revise``: a draft, a critique of the draft against the question, and
  a revision that fixes what the critique found.

    result = run_strategy(model, "If I have 3 apples and buy 4 more...", "show-work")
    result.text, result.answer

Prompts live in ``lanner/prompts/strategy_*.jinja``. With a Store, the answer
is logged as the user-facing turn and every call under it (``parent_id``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lanner.chat.calllog import Call, CallLog
from lanner.chat.prompts import render_prompt
from lanner.engine.model import Model
from lanner.errors import InvalidRequest
from lanner.store import Store

STRATEGIES = ("plain", "show-work", "self-consistency", "check-revise")
DEFAULT_SAMPLES = 5

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ARITHMETIC = re.compile(r"\d\s*[-+*/^×÷%=<>]\s*[\d(]|\d\s*\^|√|\bsqrt\b")
_MATH_WORDS = re.compile(
    r"\b(how (many|much|long|far|old)|calculate|compute|solve|sum|total|product|difference|"
    r"percent(age)?|average|mean|ratio|probability|equation|remainder|divided|multiplied|"
    r"times|twice|half|per|each|cost|price|profit|speed|rate|area|volume|factorial|prime)\b",
    re.I)
_REASONING_WORDS = re.compile(
    r"\b(prove|deduce|logic(al)?|puzzle|riddle|step by step|reason(ing)?|which of the|"
    r"true or false|if .{1,80} then)\b", re.I)
_ANSWER_LINE = re.compile(r"(?:final answer|answer)\s*(?:is)?\s*[:：]\s*(.+)", re.I)
_ANSWER_IS = re.compile(r"\bthe (?:final )?answer is\s+(.+)", re.I)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_HASHES = re.compile(r"^####\s*(.+)$", re.M)


@dataclass
class StrategyResult:
    text: str
    """What the user is shown."""
    answer: str | None
    """The extracted final answer (None when none was looked for or found)."""
    strategy: str
    calls: list[Call] = field(default_factory=list)
    votes: dict[str, int] = field(default_factory=dict)
    """self-consistency: normalised answer -> number of samples that reached it."""
    turn_id: int | None = None


def looks_like_reasoning(question: str) -> bool:
    """True for maths and reasoning questions: arithmetic, or numbers with a
    quantity word, or explicit reasoning words."""
    numbers = len(_NUMBER.findall(question))
    if _ARITHMETIC.search(question) or _REASONING_WORDS.search(question):
        return True
    return numbers >= 1 and bool(_MATH_WORDS.search(question))


def extract_answer(text: str) -> str | None:
    """The final answer a worked solution states: the last "Answer: ..." line,
    GSM8K's "#### ...", ``\\boxed{...}``, "the answer is ...", else the last
    number; None if there is none of these."""
    for pattern in (_ANSWER_LINE, _HASHES, _BOXED, _ANSWER_IS):
        found = pattern.findall(text)
        if found:
            return _clean(found[-1])
    numbers = _NUMBER.findall(text)
    return _clean(numbers[-1]) if numbers else None


def normalize_answer(answer: str) -> str:
    """What votes and accuracy compare: the last number in the answer without
    commas or a trailing ".0"; else the lowercased text."""
    numbers = _NUMBER.findall(answer)
    if not numbers:
        return answer.strip().lower().rstrip(".")
    number = numbers[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


def run_strategy(model: Model, messages: list[dict[str, Any]] | str, strategy: str, *,
                 samples: int = DEFAULT_SAMPLES, store: Store | None = None,
                 conversation_id: str | None = None, **options: Any) -> StrategyResult:
    """Answer the conversation's last user message with ``strategy``; ``options``
    are sampling options. Raises InvalidRequest naming ``strategy``/``samples``."""
    if strategy not in STRATEGIES:
        raise InvalidRequest("strategy", f"unknown strategy {strategy!r} "
                             f"(one of: {', '.join(STRATEGIES)})")
    history = [{"role": "user", "content": messages}] if isinstance(messages, str) \
        else list(messages)
    if not history or history[-1].get("role") != "user":
        raise InvalidRequest("messages", "the last message must be the user's question")
    system = next((m["content"] for m in history[:1] if m["role"] == "system"), None)
    log = CallLog(model, store, conversation_id, system)
    question = str(history[-1]["content"])
    if strategy == "self-consistency":
        result = _self_consistency(log, history, question, samples, options)
    elif strategy == "check-revise":
        result = _check_revise(log, history, question, options)
    else:
        result = _single(log, history, question, strategy, options)
    result.calls = log.calls
    result.turn_id = log.commit(question, result.text, history, strategy)
    return result


def _single(log: CallLog, history: list[dict[str, Any]], question: str, strategy: str,
            options: dict[str, Any]) -> StrategyResult:
    if strategy == "show-work" and looks_like_reasoning(question):
        text = _ask(log, history, _worked(question), "worked steps", options)
        return StrategyResult(text, extract_answer(text), strategy)
    text = _ask(log, history, question, "answer", options)
    return StrategyResult(text, None, strategy)


def _self_consistency(log: CallLog, history: list[dict[str, Any]], question: str,
                      samples: int, options: dict[str, Any]) -> StrategyResult:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InvalidRequest("samples", f"must be an integer >= 1, got {samples!r}")
    if options.get("temperature") == 0:
        raise InvalidRequest("temperature", "self-consistency needs sampling "
                             "(temperature > 0): greedy samples are all the same")
    seed = options.get("seed")
    texts = []
    for i in range(samples):
        # A given seed makes the whole vote reproducible, each sample different.
        sample_options = {**options, "seed": seed + i} if seed is not None else options
        texts.append(_ask(log, history, _worked(question), f"sample {i + 1}", sample_options))
    answers = [extract_answer(t) for t in texts]
    votes = Counter(normalize_answer(a) for a in answers if a is not None)
    if not votes:
        return StrategyResult(texts[0], None, "self-consistency")
    winner = max(votes, key=lambda a: (votes[a], -_first(a, answers)))
    chosen = _first(winner, answers)
    return StrategyResult(texts[chosen], answers[chosen], "self-consistency", votes=dict(votes))


def _check_revise(log: CallLog, history: list[dict[str, Any]], question: str,
                  options: dict[str, Any]) -> StrategyResult:
    draft = _ask(log, history, question, "draft", options)
    critique = _ask(log, history, render_prompt(
        "strategy_critique.jinja", question=question, draft=draft).strip(), "critique", options)
    revised = _ask(log, history, render_prompt(
        "strategy_revise.jinja", question=question, draft=draft, critique=critique).strip(),
        "revision", options)
    return StrategyResult(revised or draft, None, "check-revise")


def _ask(log: CallLog, history: list[dict[str, Any]], content: str, purpose: str,
         options: dict[str, Any]) -> str:
    """One call: the conversation with its last user message replaced by ``content``."""
    messages = [*history[:-1], {"role": "user", "content": content}]
    request = log.model.chat_request(messages, **options)
    return log.generate(request, messages, purpose).text.strip()


def _worked(question: str) -> str:
    return render_prompt("strategy_show_work.jinja", question=question).strip()


def _first(normalized: str, answers: list[str | None]) -> int:
    return next(i for i, a in enumerate(answers)
                if a is not None and normalize_answer(a) == normalized)


def _clean(answer: str) -> str:
    return answer.strip().strip("*").strip().rstrip(".").strip("$ ").strip()

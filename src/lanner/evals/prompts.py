"""Prompts built exactly as lm-evaluation-harness builds them (plain text, no chat
template): ``description``, then ``num_fewshot`` solved examples each followed
by ``fewshot_delimiter``, then the question. Few-shot examples come from a
``random.Random(seed)`` drawn in document order, as lm-eval's sampler does, so
the same seed gives the same examples for the same item."""

from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass
from typing import Any

import jinja2

from lanner.errors import TaskError
from lanner.evals.data import Doc
from lanner.evals.taskfile import TaskSpec


def _regex_replace(text: str, pattern: str, repl: str, count: int = 0) -> str:
    return re.sub(pattern, repl, text, count=count)


_ENV = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined,
                          keep_trailing_newline=True)
_ENV.filters["regex_replace"] = _regex_replace


@dataclass
class Item:
    """One document to evaluate, its prompt and its reference answer."""

    doc_id: int
    doc: Doc
    context: str
    choices: list[str] | None
    gold: Any
    """An index (or indices) into ``choices``, or the reference text(s)."""
    system: str = ""
    """The task's ``description``: the start of ``context``; the system message
    when the prompt is chat-formatted, the rest being one user message."""

    @property
    def target(self) -> str:
        """The reference answer as text, for display and the log."""
        gold = self.gold if isinstance(self.gold, list) else [self.gold]
        if self.choices is not None:
            return " | ".join(self.choices[g] if 0 <= g < len(self.choices) else f"<{g}>"
                              for g in gold)
        return " | ".join(str(g) for g in gold)


class Renderer:
    """``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` of one task: a field
    name returns the field, anything else is a Jinja template (lm-eval's rules)."""

    def __init__(self, spec: TaskSpec, features: set[str]) -> None:
        self.spec = spec
        self.features = features

    def _apply(self, key: str, template: str, doc: Doc) -> str:
        try:
            return _ENV.from_string(template).render(**doc)
        except jinja2.TemplateError as exc:
            raise TaskError(f"{self.spec.path}: {key}: {exc}") from exc

    def text(self, doc: Doc) -> str:
        value = self.spec.doc_to_text
        if isinstance(value, str) and value in self.features and value in doc:
            value = doc[value]
        elif isinstance(value, str):
            value = self._apply("doc_to_text", value, doc)
            if value.isdigit() and self.spec.doc_to_choice is not None:
                value = ast.literal_eval(value)
        if isinstance(value, int):
            raise TaskError(f"{self.spec.path}: doc_to_text gives a choice index (a multiple-"
                            "input task such as winogrande): not supported")
        if value is None:
            return ""
        return str(value)

    def target(self, doc: Doc) -> Any:
        value = self.spec.doc_to_target
        if isinstance(value, str) and value in self.features and value in doc:
            return doc[value]
        if not isinstance(value, str):
            return value
        text = self._apply("doc_to_target", value, doc)
        if text.isdigit() and self.spec.doc_to_choice is not None:
            return ast.literal_eval(text)
        if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
            try:
                return ast.literal_eval(text)
            except (SyntaxError, ValueError):
                return text
        return text

    def choices(self, doc: Doc) -> list[str] | None:
        value = self.spec.doc_to_choice
        if value is None:
            return None
        if isinstance(value, str) and value in self.features and value in doc:
            result = doc[value]
        elif isinstance(value, str):
            try:
                result = ast.literal_eval(self._apply("doc_to_choice", value, doc))
            except (SyntaxError, ValueError) as exc:
                raise TaskError(f"{self.spec.path}: doc_to_choice does not give a list") from exc
        elif isinstance(value, dict):
            result = list(value.values())
        else:
            result = value
        if not isinstance(result, list) or not all(isinstance(c, str) for c in result):
            raise TaskError(f"{self.spec.path}: doc_to_choice must give a list of strings")
        return result

    def description(self, doc: Doc) -> str:
        field = self.spec.description
        if not field:
            return ""
        return str(doc[field]) if field in doc else self._apply("description", field, doc)

    def answer_text(self, doc: Doc) -> str:
        """A few-shot example's answer, as lm-eval writes it after the question."""
        answer = self.target(doc)
        choices = self.choices(doc)
        if choices is not None and isinstance(answer, int):
            return choices[answer]
        if isinstance(answer, list):
            return str(answer[0])
        return str(answer)


class FewshotSampler:
    """lm-eval's ``default`` sampler (``rnd.sample``, the item itself removed when
    examples come from the test split) and its ``first_n`` sampler."""

    def __init__(self, pool: list[Doc], seed: int, first_n: bool, same_split: bool) -> None:
        self.pool = pool
        self.rnd = random.Random(seed)
        self.first_n = first_n
        self.same_split = same_split

    def sample(self, n: int, doc: Doc) -> list[Doc]:
        if n == 0:
            return []
        if self.first_n:
            pool = [d for d in self.pool if d != doc] if self.same_split else self.pool
            if n > len(pool):
                raise TaskError(f"num_fewshot is {n} but only {len(pool)} examples are available")
            return pool[:n]
        if n + self.same_split > len(self.pool):
            raise TaskError(f"num_fewshot is {n} but only {len(self.pool)} examples are available")
        if not self.same_split:
            return self.rnd.sample(self.pool, n)
        picked = [d for d in self.rnd.sample(self.pool, n + 1) if d != doc][:n]
        if len(picked) < n:  # the item appears several times in the pool
            picked = self.rnd.sample([d for d in self.pool if d != doc], n)
        return picked


def build_items(
    spec: TaskSpec, docs: list[Doc], fewshot_pool: list[Doc], *, num_fewshot: int, seed: int,
    limit: int | None = None,
) -> list[Item]:
    """The items to evaluate (the first ``limit`` documents), prompts included."""
    features = {key for doc in docs for key in doc}
    render = Renderer(spec, features)
    sampler = FewshotSampler(fewshot_pool, seed, spec.fewshot_sampler == "first_n",
                             spec.fewshot_split == spec.test_split)
    items = []
    for doc_id, doc in enumerate(docs[:limit] if limit is not None else docs):
        system = context = render.description(doc)
        for example in sampler.sample(num_fewshot, doc):
            answer = render.target(example)
            if answer is None or answer == "":  # lm-eval writes such an example bare
                context += render.text(example)
                continue
            context += (render.text(example) + spec.target_delimiter
                        + render.answer_text(example) + spec.fewshot_delimiter)
        context += render.text(doc)
        choices = render.choices(doc)
        gold = _gold(spec, render.target(doc), choices)
        items.append(Item(doc_id, doc, context, choices, gold, system))
    return items


def _gold(spec: TaskSpec, target: Any, choices: list[str] | None) -> Any:
    if choices is None:
        return target
    if spec.output_type == "generate_until" and isinstance(target, int):
        return choices[target]  # generation is scored against the choice's text
    if isinstance(target, str):
        return choices.index(target) if target in choices else -100
    if isinstance(target, list):
        return [t if isinstance(t, int) and t < len(choices) else -100 for t in target]
    return target if isinstance(target, int) and target < len(choices) else -100

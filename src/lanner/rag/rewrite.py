"""Follow-up questions into retrieval queries that survive a weak rewriter.

"And how tall is it?" carries nothing a retriever can use; with the
conversation it becomes "How tall is the Eiffel Tower?". The model rewrites
the question (prompt: ``lanner/prompts/rag_rewrite.jinja``), greedily and
briefly. The first question of a conversation is used as is, without a
model call.

Small models often answer instead of rewriting ("The answer to this
question is: The training took 20 days...") or bring in words of their own,
and such a rewrite must not become the retrieval query. So a follow-up is
retrieved with up to three queries, fused by reciprocal rank: the rewrite
(only if it passes ``check_rewrite``), the follow-up as typed, and the
previous question, which still carries the conversation's topic words.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lanner.chat.prompts import render_prompt
from lanner.engine.model import Model
from lanner.rag.text import content_words, keyword_terms, stem, words

MAX_TURNS = 6
"""Messages of history shown to the rewriter (the most recent ones)."""
MAX_CHARS_PER_TURN = 600
_PREFIX = re.compile(r"^(?:standalone question|rewritten question|question)\s*:\s*", re.I)
_ASKING_WORDS = """
what which who whom whose when where why how is are was were am do does did can could
should would will shall may might must has have had list name describe explain compare
show find give tell summarise summarize define
"""
ASKING = frozenset(_ASKING_WORDS.split())
"""First words of a question or a request (English); other languages need a '?'."""

Known = Callable[[Sequence[str]], set[str]]
"""The words (as given) that occur in the documents being searched."""


@dataclass(frozen=True, slots=True)
class Queries:
    """What retrieval searches for: the question as typed and, for a
    follow-up, the model's rewrite (if accepted) and the previous question."""

    question: str
    rewrite: str = ""
    """The model's rewrite, cleaned; '' when none was asked for."""
    rejected: str = ""
    """Why the rewrite is not used ('' when it is, or when there is none)."""
    previous: str = ""
    """The previous user question ('' for the first question)."""

    @property
    def used(self) -> list[str]:
        """The distinct queries searched and fused, best guess first."""
        candidates = [self.rewrite if self.rewrite and not self.rejected else "",
                      self.question, self.previous]
        seen: dict[str, str] = {}
        for query in candidates:
            if query.strip():
                seen.setdefault(query.strip().casefold(), query.strip())
        return list(seen.values())

    @property
    def primary(self) -> str:
        """The accepted rewrite, else the question as typed."""
        return self.rewrite if self.rewrite and not self.rejected else self.question

    def describe(self) -> list[str]:
        """One line per query (and one for a rejected rewrite), for ``-v``."""
        if not self.rewrite and not self.previous:
            return [f"retrieval query: {self.question}"]
        labels = {self.question.strip().casefold(): "as typed",
                  self.previous.strip().casefold(): "previous question"}
        if not self.rejected:
            labels[self.rewrite.strip().casefold()] = "rewritten"
        lines = [f"retrieval query ({labels[q.casefold()]}): {q}" for q in self.used]
        if self.rejected:
            lines.append(f"rewrite not used ({self.rejected}): {self.rewrite}")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {"used": self.used, "rewrite": self.rewrite, "rejected": self.rejected,
                "previous": self.previous}


def rewrite_prompt(messages: Sequence[dict[str, Any]], question: str) -> str:
    """The rewriting prompt: recent user/assistant turns, then the question."""
    return render_prompt("rag_rewrite.jinja", turns=_turns(messages), question=question)


def needs_rewrite(messages: Sequence[dict[str, Any]]) -> bool:
    """Only a question that follows an earlier user turn is rewritten."""
    return any(m.get("role") == "user" for m in messages)


def ask_rewriter(model: Model, messages: Sequence[dict[str, Any]], question: str,
                 **options: Any) -> str:
    """The model's reply to the rewriting prompt ('' for a first question).
    ``options`` are sampling options; the default is greedy, at most 64 tokens."""
    if not needs_rewrite(messages):
        return ""
    settings = {"temperature": 0.0, "max_tokens": 64, **options}
    prompt = rewrite_prompt(messages, question)
    return str(model.chat([{"role": "user", "content": prompt}], **settings)["content"])


def follow_up_queries(reply: str, question: str, messages: Sequence[dict[str, Any]],
                      known: Known) -> Queries:
    """The queries for ``question`` given the rewriter's ``reply`` and the
    conversation before it; ``known`` looks words up in the documents."""
    previous = _previous_question(messages)
    if not previous:
        return Queries(question)
    rewrite = clean_rewrite(reply)
    return Queries(question, rewrite, check_rewrite(rewrite, question, messages, known),
                   previous)


def clean_rewrite(reply: str) -> str:
    """The first line of the model's reply without a label or quotes, cut
    after its first question mark (what follows is the model's own talk)."""
    line = next((ln.strip() for ln in reply.splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line).strip().strip("\"'“”").strip()
    mark = line.find("?")
    return line[: mark + 1] if mark >= 0 else line


def check_rewrite(rewrite: str, question: str, messages: Sequence[dict[str, Any]],
                  known: Known) -> str:
    """Why ``rewrite`` is not a question about the conversation, or ''.

    Rejected: an empty or overlong rewrite; one that answers (it mentions
    "answer", or the user asked a question and the rewrite is a statement);
    one that keeps fewer than half of the follow-up's content words (it
    asks something else, often the previous question again); one that
    brings in content words found in neither the conversation nor the
    documents (``known``)."""
    if not rewrite:
        return "empty"
    if len(rewrite) > 3 * len(question) + 200:
        return "longer than a question"
    conversation = " ".join([question, *(m["content"] for m in _turns(messages))])
    if "answer" in words(rewrite) and "answer" not in words(conversation):
        return "it answers instead of asking"
    if is_question(question) and not is_question(rewrite):
        return "it is a statement, not a question"
    asked = set(content_words(question))
    kept = asked & set(content_words(rewrite))
    if 2 * len(kept) < len(asked):
        return "it leaves out the follow-up's words: " + ", ".join(sorted(asked - kept))
    said = set(content_words(conversation))
    new = [w for w in keyword_terms(rewrite) if stem(w) not in said]
    found = known(new) if new else set()
    unknown = [w for w in new if w not in found]
    if unknown:
        return ("it brings in words found in neither the conversation nor the documents: "
                + ", ".join(unknown))
    return ""


def is_question(text: str) -> bool:
    """Ends with '?' or starts like an English question or request."""
    found = words(text)
    return text.rstrip().endswith("?") or bool(found) and found[0] in ASKING


def _previous_question(messages: Sequence[dict[str, Any]]) -> str:
    return next((_clip(str(m.get("content") or "")) for m in reversed(messages)
                 if m.get("role") == "user"), "")


def _turns(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": _clip(str(m.get("content") or ""))}
            for m in messages if m.get("role") in ("user", "assistant")][-MAX_TURNS:]


def _clip(text: str) -> str:
    return text if len(text) <= MAX_CHARS_PER_TURN else text[:MAX_CHARS_PER_TURN] + "..."

"""Follow-up questions into standalone queries.

"And how tall is it?" carries nothing a retriever can use; with the
conversation it becomes "How tall is the Eiffel Tower?". The model rewrites
the question (prompt: ``lanner/prompts/rag_rewrite.jinja``), greedily and
briefly. The first question of a conversation is used as is, without a
model call. If the model's rewrite is unusable (empty, or rambling), the
query falls back to the previous question joined with the follow-up, which
still carries the conversation's topic words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lanner.chat.prompts import render_prompt
from lanner.engine.model import Model

MAX_TURNS = 6
"""Messages of history shown to the rewriter (the most recent ones)."""
MAX_CHARS_PER_TURN = 600
_PREFIX = re.compile(r"^(?:standalone question|rewritten question|question)\s*:\s*", re.I)


def rewrite_prompt(messages: Sequence[dict[str, Any]], question: str) -> str:
    """The rewriting prompt: recent user/assistant turns, then the question."""
    turns = [{"role": m["role"], "content": _clip(str(m.get("content") or ""))}
             for m in messages if m.get("role") in ("user", "assistant")][-MAX_TURNS:]
    return render_prompt("rag_rewrite.jinja", turns=turns, question=question)


def needs_rewrite(messages: Sequence[dict[str, Any]]) -> bool:
    """Only a question that follows an earlier user turn is rewritten."""
    return any(m.get("role") == "user" for m in messages)


def rewrite_query(model: Model, messages: Sequence[dict[str, Any]], question: str,
                  **options: Any) -> str:
    """A standalone version of ``question`` given the conversation ``messages``
    (chat messages before it). ``options`` are sampling options; the default
    is greedy with at most 64 new tokens."""
    if not needs_rewrite(messages):
        return question
    prompt = rewrite_prompt(messages, question)
    settings = {"temperature": 0.0, "max_tokens": 64, **options}
    reply = model.chat([{"role": "user", "content": prompt}], **settings)["content"]
    return clean_rewrite(str(reply), question, messages)


def clean_rewrite(reply: str, question: str, messages: Sequence[dict[str, Any]]) -> str:
    """The first line of the model's reply, without a label or quotes; the
    fallback when that is empty or much longer than a question should be."""
    line = next((ln.strip() for ln in reply.splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line).strip().strip("\"'“”").strip()
    if line and len(line) <= 3 * len(question) + 200:
        return line
    last = next((str(m.get("content") or "") for m in reversed(messages)
                 if m.get("role") == "user"), "")
    return f"{_clip(last)} {question}".strip()


def _clip(text: str) -> str:
    return text if len(text) <= MAX_CHARS_PER_TURN else text[:MAX_CHARS_PER_TURN] + "..."

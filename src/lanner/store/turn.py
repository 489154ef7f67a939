"""One logged response (a ``Turn``) and how it maps to a row of ``responses``."""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone

from lanner.errors import StoreError


def utc_now() -> str:
    """Now as UTC ISO 8601 with milliseconds: ``2025-01-31T12:00:00.123+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_conversation_id() -> str:
    """A 32-hex-digit id: 48 bits of Unix milliseconds then 80 random bits.

    Ids sort by creation time (to the millisecond), like a ULID, and two
    processes creating one at the same moment still do not collide.
    """
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


@dataclass(kw_only=True)
class Turn:
    """One logged response with the provenance needed to reproduce or audit it.

    Keyword-only; ``id`` is assigned by ``Store.log`` and ``created_at``
    defaults to now.
    """

    conversation_id: str
    model: str
    """The name the user asked for (registry name or path as typed)."""
    model_path: str
    model_sha256: str
    """sha256 of the model file (or folder manifest); see ``Store.file_sha256``."""
    backend: str
    backend_version: str
    chat_format: str
    chat_format_hash: str
    """sha256 of the chat template text actually used."""
    system: str | None
    prompt: str
    """The user's message for this turn."""
    response: str
    messages: list[dict[str, object]]
    """The full message list sent to the model (system, history, this prompt)."""
    sampling: dict[str, object]
    """``Request.sampling()``: temperature, top_p, ..., as sent."""
    seed: int | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    ttft_s: float
    """Seconds from request to first token."""
    total_s: float
    id: int | None = None
    created_at: str = field(default_factory=utc_now)
    parent_id: int | None = None
    """For a strategy's intermediate call: the user-facing turn it was made for.
    Turns with a parent are kept out of ``Store.conversation_messages``."""
    model_settings: dict[str, object] = field(default_factory=dict)
    """How the model was loaded where it changes the numbers: ``n_ctx`` and
    ``rope_scaling`` (see ``lanner.backends.rope.settings``)."""
    citations: dict[str, object] | None = None
    """A documents answer's sources and checked citations (``Answer.to_json``);
    None for every other answer."""
    cost: float | None = None
    """What the answer cost on a priced remote engine (``prices.toml``)."""
    currency: str | None = None


# Column order of ``responses`` minus ``id``; JSON columns carry a ``_json`` suffix.
_JSON_FIELDS = ("messages", "sampling", "model_settings", "citations")
COLUMNS: tuple[str, ...] = tuple(
    f"{f.name}_json" if f.name in _JSON_FIELDS else f.name
    for f in fields(Turn)
    if f.name != "id"
)


def to_row(turn: Turn) -> tuple[object, ...]:
    """Values for ``COLUMNS``; raises ``StoreError`` if a JSON field cannot be encoded."""
    values: list[object] = []
    for f in fields(Turn):
        if f.name == "id":
            continue
        value = getattr(turn, f.name)
        if f.name in _JSON_FIELDS:
            try:
                value = json.dumps(value, ensure_ascii=False)
            except (TypeError, ValueError) as exc:
                raise StoreError(f"turn.{f.name} cannot be stored as JSON: {exc}") from exc
        values.append(value)
    return tuple(values)


def from_row(row: sqlite3.Row) -> Turn:
    """The ``Turn`` for a ``SELECT id, <COLUMNS> FROM responses`` row."""
    data = {f.name: row[f.name] for f in fields(Turn) if f.name not in _JSON_FIELDS}
    for name in _JSON_FIELDS:
        data[name] = json.loads(row[f"{name}_json"])
    return Turn(**data)

"""Printing a stream: plain text, token probabilities, or JSON for scripts."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from lanner.engine.types import Completion, Event, Finish, TextDelta, Token


def stream_text(events: Iterable[Event], out: TextIO | None = None) -> Completion:
    """Print text as it arrives (to stdout unless ``out``); return the collected
    completion. stdout is looked up at the call, not at import: it may have been
    replaced since (tests capture it)."""
    out = out or sys.stdout
    result = Completion(text="")
    parts: list[str] = []
    for event in events:
        if isinstance(event, TextDelta):
            out.write(event.text)
            out.flush()
            parts.append(event.text)
            result.tokens.extend(event.tokens)
        elif isinstance(event, Finish):
            result.finish = event
    result.text = "".join(parts)
    return result


def stream_probs(events: Iterable[Event], out: TextIO | None = None) -> Completion:
    """One line per token: the token, its probability, the top alternatives."""
    out = out or sys.stdout
    result = Completion(text="")
    for event in events:
        if isinstance(event, Finish):
            result.finish = event
            continue
        result.text += event.text
        for token in event.tokens:
            result.tokens.append(token)
            out.write(format_token(token) + "\n")
            out.flush()
    return result


def format_token(token: Token) -> str:
    prob = math.exp(token.logprob) if token.logprob is not None else float("nan")
    alts = "  ".join(f"{t.token!r} {math.exp(t.logprob):.2%}" for t in token.top)
    return f"{token.text!r:<20} {prob:8.2%}   | {alts}"


def completion_json(model: str, result: Completion, **extra: Any) -> str:
    finish = result.finish
    data: dict[str, Any] = {
        "model": model,
        "text": result.text,
        "finish_reason": finish.reason if finish else "cancelled",
        **extra,
    }
    if finish:
        data["usage"] = {
            "prompt_tokens": finish.usage.prompt_tokens,
            "completion_tokens": finish.usage.completion_tokens,
            "total_tokens": finish.usage.total_tokens,
        }
        data["timings"] = {"ttft_s": finish.timings.ttft_s, "total_s": finish.timings.total_s}
    if any(t.logprob is not None for t in result.tokens):
        data["tokens"] = [
            {"id": t.id, "token": t.text, "logprob": t.logprob,
             "top_logprobs": [{"token": a.token, "logprob": a.logprob} for a in t.top]}
            for t in result.tokens
        ]
    return json.dumps(data, ensure_ascii=False)

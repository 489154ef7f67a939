"""The engine's vocabulary: a validated Request in, a stream of Events out.

Every backend speaks these types; the CLI, the server and the services are
built on them. Non-streaming results are "collect the stream" (see ``collect``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from lanner.errors import InvalidRequest

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True, slots=True)
class Constraint:
    """Output must match this: a JSON schema (as JSON text), a Lark grammar or a
    regex. Compiled by engine/constrain.py; ``field`` names where it came from
    (for errors), e.g. "response_format" or "--schema"."""

    kind: Literal["json_schema", "lark", "regex"]
    source: str
    field: str = "constraint"


@dataclass(frozen=True, slots=True)
class Request:
    """One generation: a prompt and the sampling settings for it.

    ``prompt`` is either text (tokenized by the backend as a plain completion:
    BOS added, special tokens not parsed) or token ids (used exactly as given;
    the chat path renders the template and tokenizes it itself).
    Values are validated on construction; a bad value raises ``InvalidRequest``
    naming the field. Nothing is silently clamped.
    """

    prompt: str | Sequence[int]
    max_tokens: int | None = 256
    """Most new tokens to generate; None means until the context window is full."""
    temperature: float = 0.8
    """0 means greedy decoding."""
    top_p: float = 0.95
    top_k: int = 40
    """0 disables top-k."""
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    """How many alternatives to report per token (0-20); implies logprobs."""
    constraint: Constraint | None = None
    """Constrained decoding: the output always matches this (see engine/constrain.py)."""

    def __post_init__(self) -> None:
        _check_prompt(self.prompt)
        _check_number("temperature", self.temperature, low=0.0)
        if not (0.0 < _finite("top_p", self.top_p) <= 1.0):
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, low=0)
        if not (0.0 <= _finite("min_p", self.min_p) <= 1.0):
            raise InvalidRequest("min_p", f"must be in [0, 1], got {self.min_p}")
        if _finite("repetition_penalty", self.repetition_penalty) <= 0:
            raise InvalidRequest(
                "repetition_penalty", f"must be > 0, got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), low=-2.0, high=2.0)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=2**32 - 1)
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequest("stop", "must be a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.logprobs, bool):
            raise InvalidRequest("logprobs", "must be true or false")
        _check_int("top_logprobs", self.top_logprobs, low=0, high=20)
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise InvalidRequest("constraint", "must be a Constraint")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    def sampling(self) -> dict[str, object]:
        """The sampling settings alone, as stored in the log."""
        return {
            name: getattr(self, name)
            for name in (
                "max_tokens", "temperature", "top_p", "top_k", "min_p",
                "repetition_penalty", "presence_penalty", "frequency_penalty",
                "seed", "stop", "logprobs", "top_logprobs",
            )
        } | ({"constraint": {"kind": self.constraint.kind, "source": self.constraint.source}}
             if self.constraint else {})


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(name, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidRequest(name, f"must be finite, got {value}")
    return float(value)


def _check_number(name: str, value: object, low: float, high: float | None = None) -> None:
    v = _finite(name, value)
    if v < low or (high is not None and v > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidRequest(name, f"must be {bound}, got {value}")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(name, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidRequest(name, f"must be {bound}, got {value}")


def _check_prompt(prompt: object) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, Sequence) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt
    ):
        if len(prompt) == 0:
            raise InvalidRequest("prompt", "must not be empty")
        return
    raise InvalidRequest("prompt", "must be text or a list of token ids")


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float
    token_id: int = -1


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token. ``logprob``/``top`` are filled only when asked for."""

    id: int
    text: str
    logprob: float | None = None
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New text, never a split UTF-8 character or part of a stop string,
    with the tokens that produced it (possibly none, possibly several)."""

    text: str
    tokens: tuple[Token, ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    drafted_tokens: int = 0
    """Speculative decoding: draft tokens the model checked for this answer."""
    accepted_tokens: int = 0
    """Of those, the ones it kept (what it would have sampled itself)."""
    cost: float | None = None
    """What the answer cost on a priced remote engine (``prices.toml``), in
    ``currency``; None for local models and unpriced remotes."""
    currency: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def speculation_log(mode: str | None, usage: Usage | None) -> dict[str, object]:
    """What a logged response keeps of speculative decoding (added to its
    sampling settings): the drafter and its counts; nothing when it was off."""
    if mode in (None, "off"):
        return {}
    drafted = usage.drafted_tokens if usage else 0
    accepted = usage.accepted_tokens if usage else 0
    return {"speculative": {"mode": mode, "drafted_tokens": drafted,
                            "accepted_tokens": accepted,
                            "acceptance_rate": round(accepted / drafted, 4) if drafted else None}}


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds: time to first token, and the whole generation."""

    ttft_s: float
    total_s: float


@dataclass(frozen=True, slots=True)
class Finish:
    """Always the last event of a stream."""

    reason: FinishReason
    usage: Usage
    timings: Timings


Event = TextDelta | Finish


@dataclass(slots=True)
class Completion:
    """A whole stream, collected."""

    text: str
    tokens: list[Token] = field(default_factory=list)
    finish: Finish | None = None


def collect(events: Iterable[Event]) -> Completion:
    """Non-streaming is collecting the stream."""
    out = Completion(text="")
    parts: list[str] = []
    for event in events:
        if isinstance(event, TextDelta):
            parts.append(event.text)
            out.tokens.extend(event.tokens)
        else:
            out.finish = event
    out.text = "".join(parts)
    return out

"""Constrained decoding: output that always matches a JSON schema (or a grammar).

Built on llguidance (a grammar engine made for this: it computes, at each step,
the set of tokens that keep the output inside the grammar). A backend asks for a
``Matcher`` per request, masks the logits with it before sampling, and tells it
which token was chosen. The end-of-sequence token is allowed only where the
output is complete, so a finished answer always parses.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt

from lanner.engine.types import Constraint
from lanner.errors import InvalidRequest, LannerError


def grammar_text(constraint: Constraint) -> str:
    """The llguidance grammar for a constraint; InvalidRequest if it is malformed."""
    from llguidance import LLMatcher

    try:
        if constraint.kind == "json_schema":
            # Fixed separators, no free whitespace: small models otherwise
            # wander off into endless newlines inside the JSON.
            grammar: str = LLMatcher.grammar_from_json_schema(
                constraint.source,
                defaults={"whitespace_flexible": False, "item_separator": ", ",
                          "key_separator": ": "},
            )
        elif constraint.kind == "lark":
            grammar = LLMatcher.grammar_from_lark(constraint.source)
        else:
            grammar = LLMatcher.grammar_from_regex(constraint.source)
    except ValueError as exc:  # llguidance reports bad schemas as ValueError
        raise InvalidRequest(constraint.field, f"invalid {constraint.kind}: {exc}") from exc
    message = LLMatcher.validate_grammar(grammar)
    if message:
        raise InvalidRequest(constraint.field, f"invalid {constraint.kind}: {message}")
    return grammar


def check(constraint: Constraint) -> None:
    """Validate a constraint at the edge, before any model work."""
    grammar_text(constraint)


class Matcher:
    """Per-request state: which tokens may come next."""

    def __init__(self, tokenizer: Any, constraint: Constraint, n_vocab: int) -> None:
        from llguidance import LLMatcher

        self._matcher = LLMatcher(tokenizer, grammar_text(constraint))
        if self._matcher.is_error():
            raise InvalidRequest(constraint.field, self._matcher.get_error())
        self._n_vocab = n_vocab
        self._mask = np.zeros((tokenizer.vocab_size + 31) // 32, dtype=np.int32)

    def allowed(self) -> npt.NDArray[np.bool_]:
        """(n_vocab,) True where the grammar allows the token next."""
        self._matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[: self._n_vocab]
        return np.pad(bits.astype(bool), (0, self._n_vocab - len(bits)))

    def mask_logits(self, logits: npt.NDArray[np.float32]) -> None:
        """Set every token the grammar forbids to -inf, in place."""
        logits[: self._n_vocab][~self.allowed()] = -np.inf

    def accept(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise LannerError(f"constrained decoding failed: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar admits nothing more (only end-of-sequence may follow)."""
        return bool(self._matcher.is_stopped())


def json_schema(schema: dict[str, Any] | str, field: str = "response_format") -> Constraint:
    """A constraint from a JSON schema given as a dict or JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(field, f"schema is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise InvalidRequest(field, "a JSON schema must be an object")
    return Constraint("json_schema", json.dumps(schema), field)


JSON_OBJECT = {"type": "object"}

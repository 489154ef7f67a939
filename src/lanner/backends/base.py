"""The backend contract. Every way of running a model implements it.

Streaming first: ``stream`` yields ``TextDelta`` events and ends with exactly one
``Finish``. Closing the generator early (a client left, Ctrl-C) must free whatever
the request held. Everything else is built on these few methods.

Optional, found with ``getattr`` by whoever can use them (the server):
``prompt_logprobs(ids, top) -> list[Token]`` scores a whole prompt in one pass
(``echo`` with ``logprobs``; without it, ``loglikelihood`` per token), and
``stream_to(request, sink) -> stop`` hands events to ``sink`` from the
backend's own thread, ``None`` last (no caller thread waits on a token).
``loglikelihood_batch(pairs) -> list[(float, bool)]`` is ``loglikelihood`` of
many pairs at once, pairs with one context sharing its computation (evaluation).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from lanner.engine.types import Event, Request


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What a model says about itself; the ChatFormat is built from this."""

    architecture: str
    """HF ``model_type`` / GGUF ``general.architecture`` (e.g. "llama", "falcon")."""
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    n_ctx_train: int
    extra: dict[str, object] = field(default_factory=dict)
    """Anything else worth logging (name, quantisation, ...)."""


@runtime_checkable
class Backend(Protocol):
    name: str
    """Short backend id stored in the log: "llama.cpp", "transformers", "fake"."""
    version: str
    """Version of the library underneath (llama-cpp-python, transformers...)."""
    n_ctx: int
    """Context window in tokens as loaded (prompt + completion must fit)."""
    metadata: ModelMetadata

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """``add_bos``: prepend BOS if the model uses one; ``special``: parse
        special-token text such as ``<|im_start|>`` into their ids."""
        ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def stream(self, request: Request) -> Generator[Event, None, None]: ...

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """lm-evaluation-harness contract: sum of log P(continuation | context)
        and whether the continuation is the greedy one, token by token."""
        ...

    def close(self) -> None: ...

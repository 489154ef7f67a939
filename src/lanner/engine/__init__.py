"""The one road to a model: Request in, Events out."""

from lanner.engine.types import (
    Completion,
    Event,
    Finish,
    Request,
    TextDelta,
    Timings,
    Token,
    TopLogprob,
    Usage,
    collect,
)

__all__ = [
    "Completion", "Event", "Finish", "Request", "TextDelta", "Timings", "Token",
    "TopLogprob", "Usage", "collect",
]

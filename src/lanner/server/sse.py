"""Server-sent events as OpenAI streams them: ``data: {json}\\n\\n`` lines,
ended by ``data: [DONE]``.

Text deltas arrive from the engine as whole characters with stop strings
already held back (``StopBuffer``), so a chunk never splits a UTF-8 character
or leaks part of a stop string; JSON-encoding each delta keeps that true.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lanner.errors import LannerError
from lanner.server.errors import error_body

DONE = b"data: [DONE]\n\n"
log = logging.getLogger("lanner.server")


async def guarded(chunks: AsyncIterator[bytes], what: str) -> AsyncIterator[bytes]:
    """Pass ``chunks`` through; an error mid-stream (the HTTP status is already
    sent) becomes one last event in OpenAI's error shape, and the stream ends."""
    try:
        async for chunk in chunks:
            yield chunk
    except LannerError as exc:
        yield event(error_body(str(exc), type=exc.error_type, param=exc.param, code=exc.code))
    except Exception:  # a bug: log it, tell the client the stream broke
        log.exception("%s failed", what)
        yield event(error_body("internal server error (see the server log)",
                               type="server_error"))


def event(data: dict[str, Any]) -> bytes:
    """One SSE event carrying a JSON object (non-ASCII text kept as UTF-8)."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() \
        + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """A streaming response that always stops its producer when it ends.

    Starlette cancels the response when the client disconnects; the cancel
    may land while the body generator is suspended at a ``yield``, where no
    ``finally`` would run until garbage collection. Here ``on_close`` runs and
    the generator is closed at once, whichever way the response ends.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        # X-Accel-Buffering: proxies such as nginx must not hold chunks back.
        super().__init__(content, headers={"Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:
                await aclose()

"""What the generation routes share: the server's state, admitting a request and
starting its streams, and reading them back (collected, or as they come).

A request's life: ``start_run`` admits its streams (or 503), loads the model if
needed, builds our ``Request`` objects in a worker thread (template rendering
and tokenizing can take a while on long prompts) and starts the streams. Errors
up to the first event are ordinary HTTP errors; ``first_event`` waits for it
before a streaming response is committed to status 200.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request as HttpRequest

from lanner.engine.model import Model
from lanner.engine.types import Completion, Event, Finish, Request, TextDelta
from lanner.errors import InvalidRequest
from lanner.server.documents import Documents
from lanner.server.embedder import Embedder
from lanner.server.metrics import Metrics
from lanner.server.pool import ModelPool
from lanner.server.streams import StreamSet

T = TypeVar("T")


@dataclass
class ServerState:
    """Everything the routes need, stored on ``app.state.lanner``."""

    pool: ModelPool
    executor: ThreadPoolExecutor
    """One worker thread per admitted stream (sized to the queue limit)."""
    metrics: Metrics
    embedder: Embedder | None
    api_key: str | None
    documents: Documents
    """Lanner's ``collection`` extension on chat completions."""
    started: int = field(default_factory=lambda: int(time.time()))


def state_of(request: HttpRequest) -> ServerState:
    state: ServerState = request.app.state.lanner
    return state


@dataclass
class Run:
    """One generation request in progress."""

    id: str
    created: int
    model: str
    """The id the client asked for (echoed in every response)."""
    fingerprint: str
    requests: list[Request]
    streams: StreamSet
    loaded: Model
    """The model serving it (held loaded until every stream has ended)."""


class ClientGone(Exception):
    """The client disconnected before a non-streaming answer was ready."""


async def start_run(
    state: ServerState, name: str, streams: int, build: Callable[[Model], list[Request]],
    id_prefix: str,
) -> Run:
    """Admit and start ``streams`` generations; ``build`` makes their Requests
    from the loaded model (it raises InvalidRequest / ContextLengthExceeded)."""
    state.pool.entry(name)  # an unknown model is a 404 before anything else
    if streams > state.pool.max_queue:
        raise InvalidRequest("n", f"{streams} generations in one request is more than this "
                             f"server's queue limit of {state.pool.max_queue}")
    lease = await state.pool.acquire(name, streams)
    try:
        requests = await asyncio.to_thread(build, lease.model)
        if len(requests) != streams:  # pragma: no cover - a bug in a route
            raise RuntimeError(f"built {len(requests)} requests for {streams} streams")
        stream_set = StreamSet(lease, requests, state.executor, state.metrics)
    except BaseException:
        lease.release_all()
        raise
    return Run(f"{id_prefix}-{uuid.uuid4().hex}", int(time.time()), name,
               fingerprint(lease.model), requests, stream_set, lease.model)


def fingerprint(model: Model) -> str:
    """OpenAI's ``system_fingerprint``: changes when the weights file, the
    backend or its version change (what decides whether a seed reproduces)."""
    backend = model.backend
    parts = (str(model.spec.path), backend.name, backend.version,
             str(getattr(backend, "n_ctx", "")))
    return "fp_" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


async def first_event(run: Run, http: HttpRequest) -> AsyncIterator[tuple[int, Event]]:
    """Wait for the first event (raising the request's error, if any, while an
    HTTP error can still be sent), then yield it and the rest. A client that
    leaves while the request is still queued raises ``ClientGone``."""
    events = run.streams.events()
    first = await until_disconnect(run, http, anext(events))

    async def rest() -> AsyncIterator[tuple[int, Event]]:
        yield first
        async for item in events:
            yield item

    return rest()


async def collect(run: Run, http: HttpRequest) -> list[Completion]:
    """Every stream collected, in choice order (``ClientGone`` if the client
    leaves first)."""
    results = [Completion(text="") for _ in run.requests]

    async def gather() -> list[Completion]:
        async for index, event in run.streams.events():
            fold(results[index], event)
        return results

    return await until_disconnect(run, http, gather())


async def until_disconnect(run: Run, http: HttpRequest, work: Awaitable[T]) -> T:
    """``work``'s result, unless the client disconnects first: then the
    request's streams are stopped and ``ClientGone`` is raised. On an error the
    streams are stopped too."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(http))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            run.streams.close()
    if task not in done:
        raise ClientGone()
    if task.exception() is not None:
        run.streams.close()
    return task.result()


def fold(result: Completion, event: Event) -> None:
    """Add one event to a collected completion."""
    if isinstance(event, TextDelta):
        result.text += event.text
        result.tokens.extend(event.tokens)
    elif isinstance(event, Finish):
        result.finish = event


async def _disconnected(http: HttpRequest) -> None:
    # The body was read already, so the next ASGI message is the disconnect.
    while (await http.receive())["type"] != "http.disconnect":
        continue


def finish_reason(result: Completion) -> str:
    """OpenAI's finish_reason; a stream cut short (no Finish) reads as "stop"."""
    return "length" if result.finish and result.finish.reason == "length" else "stop"


def prompt_tokens(requests: list[Request], per_prompt: int) -> int:
    """Prompt tokens as OpenAI bills them: each distinct prompt once (``n``
    choices of one prompt share it)."""
    return sum(len(r.prompt) for r in requests[::per_prompt])


def completion_tokens(results: list[Completion]) -> int:
    return sum(r.finish.usage.completion_tokens for r in results if r.finish)

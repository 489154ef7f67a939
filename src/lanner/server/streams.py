"""Running backend streams for the event loop: one worker thread per stream.

``backend.stream()`` is a blocking iterator and safe to call from several
threads at once (the llama.cpp backend decodes concurrent streams together, in
one batch). Each stream runs whole in one worker thread, which posts its events
to an asyncio queue; the loop never blocks on a token. ``StreamSet.close``
(a client left, a request failed) tells the workers to stop: each closes its
generator from its own thread at the next event, which frees the batch slot.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lanner.engine.types import Event, Finish, Request
from lanner.server.metrics import Metrics
from lanner.server.pool import Lease


@dataclass(frozen=True, slots=True)
class _Done:
    """A stream's worker has finished (after its generator was closed)."""


Item = tuple[int, Event | _Done | BaseException]


class StreamSet:
    """The ``n`` streams of one request, merged: ``events()`` yields
    ``(choice_index, event)`` in arrival order until every stream has finished."""

    def __init__(
        self, lease: Lease, requests: list[Request], executor: ThreadPoolExecutor,
        metrics: Metrics,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._cancel = threading.Event()
        self._lease = lease
        self._metrics = metrics
        self._pending = len(requests)
        self._start = time.perf_counter()
        for index, request in enumerate(requests):
            executor.submit(self._work, index, request)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Raises what a backend stream raised (and stops the other streams)."""
        while self._pending:
            index, item = await self._queue.get()
            if isinstance(item, _Done):
                self._pending -= 1
            elif isinstance(item, BaseException):
                self.close()
                raise item
            else:
                yield index, item

    def close(self) -> None:
        """Stop every stream of this request (idempotent, returns at once)."""
        self._cancel.set()

    # -- the worker thread ------------------------------------------------------

    def _post(self, item: Item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._cancel.set()

    def _work(self, index: int, request: Request) -> None:
        started = False
        events: Iterator[Event] | None = None
        try:
            if self._cancel.is_set():
                return
            events = self._lease.model.backend.stream(request)
            for event in events:
                if not started:
                    started = True
                    self._lease.started()
                    self._metrics.observe_ttft(self._lease.name,
                                               time.perf_counter() - self._start)
                if isinstance(event, Finish):
                    self._metrics.count_tokens(self._lease.name, event.usage.prompt_tokens,
                                               event.usage.completion_tokens)
                self._post((index, event))
                if self._cancel.is_set():
                    break
        except Exception as exc:  # reported to the request's handler, which maps it
            self._post((index, exc))
        finally:
            try:
                _close(events)
            finally:
                self._lease.release(started)
                self._post((index, _Done()))


def _close(events: Iterator[Event] | None) -> None:
    close: Callable[[], None] | None = getattr(events, "close", None)
    if close is not None:
        close()

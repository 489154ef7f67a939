"""Running backend streams for the event loop.

A backend with ``stream_to`` (llama.cpp) delivers each stream's events from its
scheduler thread straight to the loop: no thread of ours waits on a token.
Otherwise each stream runs whole in one worker thread: ``backend.stream()`` is
a blocking iterator, safe to call from several threads at once, and the worker
posts its events to the loop. Either way the loop never blocks on a token, and
``StreamSet.close`` (a client left, a request failed) makes every stream leave
its batch slot at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

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
        self._stops: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        stream_to = getattr(lease.model.backend, "stream_to", None)
        # Streams started by stream_to: events() yields nothing before every one
        # has been accepted or refused, so a refused prompt (an id outside the
        # vocabulary) is the request's 400 even when another prompt's first
        # token is quicker than the refusal.
        self._starting = len(requests) if stream_to is not None else 0
        self._all_started = asyncio.Event()
        if not self._starting:
            self._all_started.set()
        self._start_error: BaseException | None = None
        for index, request in enumerate(requests):
            if stream_to is not None:
                # Only the start runs in a worker (tokenizing, compiling a grammar).
                executor.submit(self._start_direct, stream_to, index, request)
            else:
                executor.submit(self._work, index, request)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Raises what a backend stream raised (and stops the other streams)."""
        await self._all_started.wait()
        if self._start_error is not None:
            self.close()
            raise self._start_error
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
        with self._lock:
            stops = list(self._stops)
        for stop in stops:
            stop()

    # -- other threads: feeding the loop ----------------------------------------

    def _post(self, item: Item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.close()

    def _start_direct(self, stream_to: Callable[..., Callable[[], None]], index: int,
                      request: Request) -> None:
        started = False

        def sink(item: object) -> None:  # on the backend's scheduler thread
            nonlocal started
            if item is None:  # the stream has left its slot
                self._lease.release(started)
                self._post((index, _Done()))
                return
            if isinstance(item, BaseException):
                self._post((index, item))
                return
            if not started:
                started = True
                self._lease.started()
                self._metrics.observe_ttft(self._lease.name, time.perf_counter() - self._start)
            if isinstance(item, Finish):
                self._metrics.count_tokens(self._lease.name, item.usage.prompt_tokens,
                                           item.usage.completion_tokens)
            self._post((index, cast(Event, item)))

        if self._cancel.is_set():  # closed before it started
            self._end_unstarted(index)
            self._start_done(None)
            return
        try:
            stop = stream_to(request, sink)
        except Exception as exc:  # the request's handler maps it
            self._post((index, exc))
            self._end_unstarted(index)
            self._start_done(exc)
            return
        self._start_done(None)
        with self._lock:
            self._stops.append(stop)
            stopped = self._cancel.is_set()
        if stopped:  # close() came before the stop function was known
            stop()

    def _start_done(self, error: BaseException | None) -> None:
        with self._lock:
            if error is not None and self._start_error is None:
                self._start_error = error
            self._starting -= 1
            last = self._starting == 0
        if last:  # a closed loop (RuntimeError) has nobody listening any more
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._all_started.set)

    def _end_unstarted(self, index: int) -> None:
        self._lease.release(False)
        self._post((index, _Done()))

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

"""The served models: loaded on first use, unloaded after ``keep_alive_s`` idle,
and admission control so the server never holds more than ``max_queue`` streams.

A *stream* is one generation (a request with ``n=2`` is two). ``acquire``
admits a request's streams or raises ``Overloaded`` (503 with Retry-After)
at once instead of letting clients hang; each stream is released by the worker
thread that ran it, after the backend's generator is closed, so the count is
the real occupancy of the backend. Counters are touched from the event loop and
from worker threads, hence one threading lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from lanner.engine.engine import Engine
from lanner.engine.model import Model
from lanner.errors import InvalidRequest, ModelNotFound, Overloaded

# uvicorn's own logger: its handler prints INFO lines beside "Uvicorn running on".
log = logging.getLogger("uvicorn.error")


@dataclass
class _Entry:
    name: str
    model: Model | None = None
    pinned: bool = False
    """Given ready-loaded by the caller (engine.attach): never unloaded here."""
    active: int = 0
    idle_since: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Lease:
    """The streams of one request on one model. The worker running a stream
    calls ``started`` at its first event and ``release`` when it ends (from any
    thread); ``release_all`` returns the streams of a request that failed before
    they ran."""

    def __init__(self, pool: ModelPool, entry: _Entry, streams: int) -> None:
        self._pool = pool
        self._entry = entry
        self._left = streams

    @property
    def model(self) -> Model:
        if self._entry.model is None:  # pragma: no cover - held models are never unloaded
            raise RuntimeError("lease on an unloaded model")
        return self._entry.model

    @property
    def name(self) -> str:
        return self._entry.name

    def started(self) -> None:
        """A stream produced its first event: it left the queue."""
        with self._pool.lock:
            self._pool.waiting -= 1

    def release(self, started: bool) -> None:
        """One stream ended; ``started``: whether it had called ``started``."""
        self._give_back(1, 0 if started else 1)

    def release_all(self) -> None:
        """Every stream not yet released, none of them started."""
        self._give_back(self._left, self._left)

    def _give_back(self, streams: int, unstarted: int) -> None:
        with self._pool.lock:
            streams = min(streams, self._left)
            self._left -= streams
            self._pool.waiting -= min(unstarted, streams)
        if streams:
            self._pool.release(self._entry, streams)


class ModelPool:
    def __init__(
        self, engine: Engine, names: list[str], *, keep_alive_s: float, max_queue: int,
        load_options: dict[str, Any] | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.engine = engine
        self.keep_alive_s = keep_alive_s
        self.max_queue = max_queue
        self.load_options = dict(load_options or {})
        self.lock = threading.Lock()
        self.in_flight = 0
        """Admitted streams: generating, or waiting for a batch slot."""
        self.waiting = 0
        """Admitted streams that have not produced their first event yet."""
        ready = {m.name: m for m in engine.loaded()}
        self._entries = {
            name: _Entry(name, ready.get(name), pinned=name in ready) for name in names
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # strong refs until done

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def is_loaded(self, name: str) -> bool:
        return self._entries[name].model is not None

    def entry(self, name: str) -> _Entry:
        """The served model by its id; ModelNotFound (404) otherwise."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(
                f"the model {name!r} does not exist on this server "
                f"(served: {', '.join(self._entries)})")
        return entry

    async def acquire(self, name: str, streams: int) -> Lease:
        """Admit ``streams`` generations on model ``name``, loading it if needed."""
        entry = self.entry(name)
        self._loop = asyncio.get_running_loop()
        with self.lock:
            if self.in_flight + streams > self.max_queue:
                raise Overloaded(
                    f"the server is busy ({self.in_flight} of {self.max_queue} generations "
                    "in flight); retry shortly", retry_after=1)
            self.in_flight += streams
            self.waiting += streams
            entry.active += streams
        lease = Lease(self, entry, streams)
        try:
            async with entry.lock:
                if entry.model is None:
                    entry.model = await asyncio.to_thread(
                        self.engine.load, name, **self.load_options)
                    log.info("Loaded %s: %s", name, describe(entry.model))
        except BaseException:
            lease.release_all()
            raise
        return lease

    def release(self, entry: _Entry, streams: int) -> None:
        """Streams ended (any thread); an idle model starts its keep-alive clock."""
        with self.lock:
            self.in_flight -= streams
            entry.active -= streams
            idle = entry.active == 0
            if idle:
                entry.idle_since = time.monotonic()
            stamp = entry.idle_since
        if idle and not entry.pinned and self.keep_alive_s >= 0 and self._loop is not None:
            # A closed loop means the server is shutting down: nothing to schedule.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._schedule_unload, entry, stamp)

    def _schedule_unload(self, entry: _Entry, stamp: float) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(self.keep_alive_s, self._start_unload, entry, stamp)

    def _start_unload(self, entry: _Entry, stamp: float) -> None:
        task = asyncio.get_running_loop().create_task(self._unload_if_idle(entry, stamp))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unload_if_idle(self, entry: _Entry, stamp: float) -> None:
        async with entry.lock:
            with self.lock:
                still_idle = entry.active == 0 and entry.idle_since == stamp
            if still_idle and entry.model is not None:
                model, entry.model = entry.model, None
                await asyncio.to_thread(self.engine.unload, model)

    def add_loaded(self, name: str, model: Model, *, base: str) -> None:
        """Serve ``model``, built on the loaded model ``base`` (an adapter on its
        weights), as ``name`` from now on. Both stay loaded: ``base`` is pinned,
        since unloading it would free weights that ``model`` still uses."""
        with self.lock:
            if name in self._entries:
                raise InvalidRequest("name", f"this server already serves a model {name!r}")
            self._entries[base].pinned = True
            self._entries[name] = _Entry(name, model, pinned=True)

    def close(self) -> None:
        """Unload what this pool loaded (pinned models belong to the caller)."""
        for entry in self._entries.values():
            if entry.model is not None and not entry.pinned:
                self.engine.unload(entry.model)
                entry.model = None


def describe(model: Model) -> str:
    """The backend and its window, and the KV layout where it has one."""
    backend = model.backend
    text = f"{backend.name}, {backend.n_ctx} tokens a request"
    layout = getattr(backend, "kv_layout", None)
    if layout is not None:
        slots = getattr(backend, "n_seq_max", 0)
        size = getattr(backend, "kv_bytes", 0) / 2**30
        text += f", {slots} slots, {layout} KV cache of {size:.2f} GiB"
    return text

"""Continuous batching for the transformers backend.

One scheduler thread owns a ``SlotCache``. Each step it admits waiting
requests (up to ``n_slots`` running), runs each newcomer's prompt in chunks,
then feeds the next token of every running request in one forward pass per
adapter (a peft adapter is module state: one pass, one adapter). Each request
chooses its own next token from its row of logits and hands its events to its
``sink``; a request that finished or was cancelled leaves between steps and the
last running row moves into its place, so the running rows stay ``0..B-1``
and a pass reads plain views of the cache. With nothing running the cache is
dropped, so an idle model holds no KV memory.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from lanner.backends.hf_slots import SlotCache
from lanner.engine.types import Event
from lanner.errors import LannerError

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds the mask's (T, kv_len) size

Forward = Callable[[str | None, SlotCache, list[int], torch.Tensor, torch.Tensor, int],
                   torch.Tensor]
"""(adapter, cache, rows, ids (B, T), positions (B, T), kv_len) -> float32 logits
(B, V) of each row's last token; ``kv_len`` is the largest position + 1."""


class Run(Protocol):
    """One request's generation state (``hf_run.Run``)."""

    prompt_ids: list[int]
    adapter: str | None

    def advance(self, logits: torch.Tensor) -> tuple[list[Event], int | None]:
        """Choose from ``logits`` (V,): the events to send and the token to feed
        next, or None once the request is done (its events end with Finish)."""
        ...


@dataclass(eq=False)
class Job:
    run: Run
    sink: Callable[[object], None]
    """Gets each Event, or the exception that ended the request, then None."""
    row: int = -1
    position: int = 0  # where the next fed token goes
    next_id: int | None = None
    cancelled: bool = False
    done: bool = False
    left: threading.Event = field(default_factory=threading.Event)


class Scheduler:
    """Runs submitted jobs from its own thread; other threads submit and cancel."""

    def __init__(self, forward: Forward, n_slots: int, device: torch.device) -> None:
        self.forward = forward
        self.n_slots = n_slots
        self.device = device
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self.max_batch = 0
        """Most requests decoded together in one step so far."""
        self.steps = 0
        self._cache = SlotCache()
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- any thread -------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closing:
                raise LannerError("the transformers model is closed")
            if self._thread is None:  # started on first use: loading a model starts no thread
                self._thread = threading.Thread(target=self._loop, name="lanner-transformers",
                                                daemon=True)
                self._thread.start()
            self.waiting.append(job)
            self._cv.notify()

    def cancel(self, job: Job, wait: bool = False) -> None:
        """Make ``job`` leave at the next step; with ``wait``, return once it has."""
        with self._cv:
            job.cancelled = True
            self._cv.notify()
        if wait and threading.current_thread() is not self._thread:
            job.left.wait()

    def close(self) -> None:
        """Fail waiting and running jobs and stop the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join()

    # -- the scheduler thread -----------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self.waiting or self.active or self._closing):
                    self._cache = SlotCache()  # idle: give the KV memory back
                    self._cv.wait()
                if self._closing:
                    jobs = [*self.active, *self.waiting]
                    self.active, self.waiting = [], deque()
                    break
                gone = [j for j in self.waiting if j.cancelled]
                self.waiting = deque(j for j in self.waiting if not j.cancelled)
                admitted: list[Job] = []
                while self.waiting and len(self.active) + len(admitted) < self.n_slots:
                    admitted.append(self.waiting.popleft())
            for job in gone:
                self._leave(job)
            try:
                with torch.inference_mode():
                    self._step(admitted)
            except Exception as exc:  # a bug here must not leave readers waiting forever
                for job in [*self.active, *(j for j in admitted if j.row < 0)]:
                    self._leave(job, exc)
                self.active, self._cache = [], SlotCache()
        for job in jobs:
            self._leave(job, LannerError("the transformers model was closed"))

    def _step(self, admitted: list[Job]) -> None:
        for job in admitted:
            if job.cancelled:
                self._leave(job)
                continue
            job.row = len(self.active)
            self.active.append(job)
            self._guarded([job], self._prefill)
        self._drop_finished()
        groups: dict[str | None, list[Job]] = {}
        for job in self.active:
            groups.setdefault(job.run.adapter, []).append(job)
        for jobs in groups.values():
            self._guarded(jobs, self._decode)
        self.max_batch = max(self.max_batch, len(self.active))
        self.steps += 1
        self._drop_finished()

    def _guarded(self, jobs: list[Job], work: Callable[[list[Job]], None]) -> None:
        try:
            work(jobs)
        except Exception as exc:  # a failed pass ends its requests, not the server
            for job in jobs:
                if not job.done:
                    job.done = True
                    job.sink(exc)

    def _prefill(self, jobs: list[Job]) -> None:
        (job,) = jobs
        ids = job.run.prompt_ids
        device = self.device
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = torch.tensor([ids[start : start + PREFILL_CHUNK]], device=device)  # (1, T)
            end = start + chunk.shape[1]
            positions = torch.arange(start, end, device=device)[None]
            logits = self.forward(job.run.adapter, self._cache, [job.row], chunk, positions, end)
        job.position = len(ids)
        self._advance(job, logits[0])

    def _decode(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not (j.done or j.cancelled)]
        if not jobs:
            return
        device = self.device
        ids = torch.tensor([[j.next_id] for j in jobs], device=device)  # (B, 1)
        positions = torch.tensor([[j.position] for j in jobs], device=device)  # (B, 1)
        kv_len = max(j.position for j in jobs) + 1
        logits = self.forward(jobs[0].run.adapter, self._cache, [j.row for j in jobs], ids,
                              positions, kv_len)
        for job, row in zip(jobs, logits, strict=True):
            job.position += 1
            self._advance(job, row)

    def _advance(self, job: Job, logits: torch.Tensor) -> None:
        try:
            events, job.next_id = job.run.advance(logits)
        except Exception as exc:  # this request's failure (its grammar...), not the batch's
            job.done = True
            job.sink(exc)
            return
        for event in events:
            job.sink(event)
        job.done = job.next_id is None

    def _drop_finished(self) -> None:
        """Remove done and cancelled jobs; the last rows move into their places."""
        for job in [j for j in self.active if j.done or j.cancelled]:
            last = self.active.pop()
            if last is not job:
                self._cache.move(last.row, job.row)
                last.row = job.row
                self.active[job.row] = last
            self._leave(job)

    def _leave(self, job: Job, error: BaseException | None = None) -> None:
        if error is not None and not job.done:
            job.sink(error)
        job.done = True
        job.sink(None)
        job.left.set()

"""Continuous batching over one llama.cpp context.

One scheduler thread owns the context (its ``llama_decode`` calls run on the
process's one decoding thread, see ``llamacpp_native.decode``). Each step it
builds one batch: the next token of
every generating sequence first, then prompt chunks of sequences still
prefilling, up to ``n_batch`` tokens; one ``llama_decode`` runs them all over the
shared KV cache, then each job samples from its own rows. Requests join and
leave between steps; more than ``n_seq_max`` wait in a FIFO queue.

A finished sequence's KV stays in its slot as a prefix cache: a new request
starting with the same tokens (the next turn of a chat) takes that slot and
decodes only the rest (at least two tokens: ``reuse_cap``). In a unified
cache (all slots share ``n_ctx`` cells) idle caches are evicted, least
recently used first, when the cells are needed;
in a split cache each slot owns ``n_ctx`` cells and nothing is ever evicted.

In a split cache llama.cpp decodes consecutive sequence ids in one pass over
the weights, and each further run of busy ids costs another pass. Requests
end in any order, so when one leaves a gap the busy sequence with the highest
id moves into it (``_compact``: llama.cpp copies the sequence's KV buffer
within the next ``llama_decode``). The slot it leaves keeps those cells as an
idle prefix cache; the gap's own idle cache is overwritten.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from lanner.errors import LannerError

from .llamacpp_jobs import Job
from .llamacpp_native import decode
from .speculative import SPEC_BATCH_TOKENS, SPEC_MAX_STREAMS, DraftModel, StepCosts

_CANCEL_WAIT_S = 30.0
_FAR_REUSE = 512
"""Cached prompt tokens worth a slot that splits the busy ids (split cache)."""


@dataclass(eq=False)
class Slot:
    """One KV sequence id; ``tokens`` is exactly what its cache holds, by position."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    job: Job | None = None
    last_used: float = 0.0


class _Batch:
    """A reusable llama_batch: one sequence id per token."""

    def __init__(self, capacity: int) -> None:
        self.raw = llama_cpp.llama_batch_init(capacity, 0, 1)
        # Pointer objects cached once: attribute access on the struct allocates.
        self._token, self._pos = self.raw.token, self.raw.pos
        self._n_seq, self._seq, self._out = self.raw.n_seq_id, self.raw.seq_id, self.raw.logits
        self.n = 0

    def add(self, token: int, pos: int, seq_id: int, output: bool) -> None:
        i = self.n
        self._token[i] = token
        self._pos[i] = pos
        self._n_seq[i] = 1
        self._seq[i][0] = seq_id
        self._out[i] = output
        self.n = i + 1

    def free(self) -> None:
        llama_cpp.llama_batch_free(self.raw)


def reuse_cap(job: Job) -> int:
    """Most cached tokens a job may reuse: it decodes at least the two tokens
    before its first output. llama.cpp computes a row alone (one token) by
    another code path than rows of a batch, and they round differently (a
    prompt's last logits up to 0.27 apart on smollm2 BF16, 0.017 on F16),
    while a row in any batch of two or more tokens comes out bit-identical
    (measured): so a prompt whose prefix was cached gives the same first
    logits, and the same seeded answer, as the same prompt decoded afresh."""
    return max(0, job.first_output - 1)


def common_prefix(a: list[int], b: list[int], cap: int) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if n >= cap or x != y:
            break
        n += 1
    return n


class Scheduler:
    """Drives one llama.cpp context from its own thread (its ``llama_decode``
    calls run on the process's one decoding thread); other threads submit jobs."""

    def __init__(self, ctx: Any, *, n_ctx: int, n_batch: int, n_seq_max: int,
                 split: bool = False, draft_model: DraftModel | None = None) -> None:
        self.ctx = ctx
        self.draft_model = draft_model
        """Proposes drafts for jobs speculating with a model (else: their n-grams)."""
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        self.step_costs = StepCosts(SPEC_BATCH_TOKENS)
        """What a step of n tokens costs here: how many drafts pay."""
        self.split = split
        """Each slot owns ``n_ctx`` cells (else all slots share ``n_ctx``)."""
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.slots = [Slot(i) for i in range(n_seq_max)]
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self.max_batch_seqs = 0
        """Most sequences decoded together in one llama_decode call so far."""
        self.decode_calls = 0
        self.reused_tokens = 0
        """Prompt tokens not decoded again because a slot's cache held them."""
        self.moves = 0
        """Busy sequences moved to a lower id (split cache, ``_compact``)."""
        self._slot_of: dict[Job, Slot] = {}
        self._cv = threading.Condition()
        self._closing = False
        self._batch = _Batch(n_batch)
        self.thread = threading.Thread(target=self._run, name="lanner-llama.cpp", daemon=True)
        self.thread.start()

    # -- any thread -----------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closing:
                raise LannerError("the llama.cpp model is closed")
            job.submitted = time.perf_counter()
            self.waiting.append(job)
            self._cv.notify()

    def cancel(self, job: Job, wait: bool = True) -> None:
        """Make ``job`` leave at the next step; with ``wait``, return only once
        its slot is free."""
        with self._cv:
            if job in self.waiting:
                self.waiting.remove(job)
                job.free()
                job.release()
            job.cancelled = True
            self._cv.notify()
        # Never wait on ourselves (a generator finalised on the scheduler thread).
        if wait and threading.current_thread() is not self.thread:
            job.released.wait(_CANCEL_WAIT_S)

    def next_event(self, job: Job) -> object:
        """The job's next output; raises if the scheduler thread died."""
        while True:
            try:
                return job.out.get(timeout=0.5)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise LannerError("the llama.cpp scheduler has stopped") from None

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        if threading.current_thread() is not self.thread:
            self.thread.join()

    # -- scheduler thread -----------------------------------------------------

    def _run(self) -> None:
        try:
            while self._wait_for_work():
                try:
                    self._step()
                except Exception as e:  # a bug must not leave callers waiting forever
                    self._fail(list(self.active), LannerError(f"llama.cpp step failed: {e}"))
        finally:
            self._shutdown()

    def _wait_for_work(self) -> bool:
        with self._cv:
            while True:
                self._reap()
                self._admit()
                self._compact()
                if self._closing:
                    return False
                if self.active:
                    return True
                self._cv.wait()

    def _admit(self) -> None:
        """Move waiting jobs into free slots while their prompts fit (FIFO)."""
        while self.waiting:
            job = self.waiting[0]
            idle = [s for s in self.slots if s.job is None]
            if not idle:
                return
            slot = self._choose(job, idle)
            reuse = common_prefix(slot.tokens, job.tokens, reuse_cap(job))
            # Its cached prefix turns from idle (evictable) into held cells too.
            if not self.split and len(job.tokens) > self._unreserved_cells():
                return
            self.waiting.popleft()
            self._attach(job, slot, reuse)

    def _choose(self, job: Job, idle: list[Slot]) -> Slot:
        """The idle slot for ``job``: the longest cached prefix of its tokens.

        In a split cache llama.cpp decodes a batch in one pass only over
        consecutive sequence ids; each separate run of busy ids costs another
        pass over all the weights, every step. There a slot that keeps the busy
        ids in fewer runs wins, unless another holds a long prefix.
        """
        def reuse(s: Slot) -> int:
            return common_prefix(s.tokens, job.tokens, reuse_cap(job))

        if not self.split:
            return max(idle, key=lambda s: (reuse(s), -len(s.tokens), -s.last_used))
        busy = {s.seq_id for s in self.slots if s.job is not None}
        best = max(idle, key=lambda s: (reuse(s), -s.seq_id))
        if not busy or reuse(best) >= _FAR_REUSE:
            return best

        def joins(s: Slot) -> int:  # runs removed (1), unchanged (0) or added (-1)
            return (s.seq_id - 1 in busy) + (s.seq_id + 1 in busy) - 1

        return max(idle, key=lambda s: (joins(s), reuse(s), -s.seq_id))

    def _attach(self, job: Job, slot: Slot, reuse: int) -> None:
        if len(slot.tokens) > reuse:
            # Some memories (recurrent, sliding window) cannot drop a suffix.
            if not llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, reuse, -1):
                llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
                reuse = 0
            del slot.tokens[reuse:]
        job.feed = job.tokens[reuse:]
        self.reused_tokens += reuse
        slot.job = job
        self._slot_of[job] = slot
        self.active.append(job)

    def _compact(self) -> None:
        """Split cache: close the gaps between busy sequence ids.

        Measured on smollm2 BF16, 2 threads: a step of 5 streams in 3 runs
        took 40 ms against 17-20 ms in one run, and a move (a copy of the
        sequence's whole KV buffer, 180 MB at 8,192 cells) about as much
        as one step."""
        if not self.split:
            return
        while True:
            ids = [s.seq_id for s in self.slots if s.job is not None]
            if not ids or ids[-1] - ids[0] + 1 == len(ids):
                return
            gap = next(s for s in self.slots[ids[0]:ids[-1]] if s.job is None)
            self._move(self.slots[ids[-1]], gap)

    def _move(self, src: Slot, dst: Slot) -> None:
        job = src.job
        assert job is not None and dst.job is None
        # Only whole sequences copy across streams; the copy waits for the next decode.
        llama_cpp.llama_memory_seq_cp(self.mem, src.seq_id, dst.seq_id, -1, -1)
        dst.tokens = list(src.tokens)
        dst.job, src.job = job, None
        src.last_used = time.monotonic()
        self._slot_of[job] = dst
        self.moves += 1

    def _unreserved_cells(self) -> int:
        """Cells neither held by active sequences nor promised to their prompts."""
        held = sum(len(s.tokens) for s in self.slots if s.job is not None)
        return self.n_ctx - held - sum(len(j.feed) for j in self.active)

    def _room(self, slot: Slot, want: int, planned: int = 0) -> int:
        """Up to ``want`` free KV cells for ``slot``, evicting idle prefix caches
        if needed (unified cache: ``planned`` cells are promised this step already)."""
        if self.split:
            return max(0, min(want, self.n_ctx - len(slot.tokens)))
        free = self.n_ctx - sum(len(s.tokens) for s in self.slots) - planned
        if free >= want:
            return want
        for idle in sorted((s for s in self.slots if s.job is None and s.tokens),
                           key=lambda s: s.last_used):
            if free >= want:
                break
            free += len(idle.tokens)
            self._drop(idle)
        return max(0, min(want, free))

    def _evict_idle(self) -> None:
        for slot in self.slots:
            if slot.job is None and slot.tokens:
                self._drop(slot)

    def _drop(self, slot: Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        slot.tokens = []

    def _step(self) -> None:
        began = time.perf_counter()
        plan = self._plan()
        if not plan:
            # Nothing fits (only possible if the context is full of active work).
            for job in self.active:
                if not (job.done or job.cancelled):
                    job.cut()
            self._reap()
            return
        # Only steps of generating sequences (each its next token and a draft)
        # teach the step costs: a prompt chunk outputs one row, unsampled, and
        # is cheaper than a draft of as many tokens (a 19-token prompt tail
        # measured below a 16-token draft made every shorter draft look cheap).
        drafting = all(n == 1 + len(job.draft) for job, _, n, _ in plan)
        try:
            self._decode(len(plan))
        except LannerError as e:
            self._fail([job for job, _, _, _ in plan], e)
            return
        for job, slot, n, start in plan:
            base = len(slot.tokens)
            slot.tokens.extend(job.feed[:n])
            del job.feed[:n]
            for i in range(n):
                if job.cancelled or job.done:
                    break
                if base + i >= job.first_output:
                    job.on_output(self.ctx, start + i, base + i)
            self._settle(job, slot)
        # The whole step (drafting, decoding, every row's sample and its text
        # handed on): what a step of this size costs a client, overheads included.
        if drafting:
            self.step_costs.record(self._batch.n, time.perf_counter() - began)
        self._reap()

    def _settle(self, job: Job, slot: Slot) -> None:
        """Count a draft round and drop its rejected tokens' KV cells."""
        drafted = len(job.draft)
        drop = job.settle()
        self.drafted_tokens += drafted
        self.accepted_tokens += drafted - drop
        if drop:
            del slot.tokens[-drop:]
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, len(slot.tokens), -1)

    def _draft(self) -> None:
        """Speculation: drafts for generating jobs while the batch has spare compute.

        How many draft tokens each gets comes from what steps of each size have
        cost here and how often its drafts were right (``StepCosts.allocate``):
        on a CPU a step of a few tokens costs about one token's, so one stream
        drafts several; as more sequences share the batch the drafts shrink,
        and none are added while more than ``SPEC_MAX_STREAMS`` generate, or
        while a prompt is being decoded or a request waits (8 streams
        arriving together: drafts of the first to start would slow the
        others' prompts)."""
        live = [j for j in self.active if not (j.done or j.cancelled)]
        generating = [j for j in live
                      if len(j.feed) == 1 and len(self._slot_of[j].tokens) >= len(j.tokens)]
        if len(generating) < len(live) or self.waiting:  # prompts to decode take the room
            return
        wanting = [(j, k) for j in generating if (k := j.wants_draft()) > 0]
        if not wanting or len(generating) > SPEC_MAX_STREAMS:
            return
        proposals = None
        if self.draft_model is None:  # n-grams cost nothing to look up: see what there is
            proposals = [j.propose(k) for j, k in wanting]
            wanting = [(j, len(p)) for (j, _), p in zip(wanting, proposals, strict=True)]
        ks = self.step_costs.allocate([j.chances(k) for j, k in wanting], len(generating))
        if proposals is not None:
            drafts = [p[:k] for p, k in zip(proposals, ks, strict=True)]
        else:
            chosen = [(j, k) for (j, _), k in zip(wanting, ks, strict=True) if k > 0]
            drafts = self.draft_model.propose(  # type: ignore[union-attr]
                [(self._slot_of[j].seq_id, j.spec_history(), k) for j, k in chosen])
            wanting = chosen
        for (job, _), draft in zip(wanting, drafts, strict=True):
            if draft:
                job.set_draft(draft)

    def _plan(self) -> list[tuple[Job, Slot, int, int]]:
        """Fill the batch: generating sequences first (one token each), then
        prompt chunks. Returns (job, slot, tokens taken, first batch index).

        The batch lists sequences by id: llama.cpp's split cache groups only
        consecutive ids, in batch order, into one pass."""
        self._draft()
        taken: list[tuple[Job, Slot, int]] = []
        budget = self.n_batch
        for job in sorted(self.active, key=lambda j: len(j.feed) - len(j.draft) > 1):
            if job.done or job.cancelled or not job.feed or budget == 0:
                continue
            slot = self._slot_of[job]
            n = self._room(slot, min(budget, len(job.feed)), self.n_batch - budget)
            if n == 0:
                if len(slot.tokens) >= len(job.tokens):  # generating: no cell for its next token
                    job.cut()
                continue
            if n < len(job.feed) and job.draft:  # no room for all of the draft
                cut = min(len(job.feed) - n, len(job.draft))
                del job.draft[len(job.draft) - cut:]
                del job.feed[len(job.feed) - cut:]
            taken.append((job, slot, n))
            budget -= n
        batch = self._batch
        batch.n = 0
        plan: list[tuple[Job, Slot, int, int]] = []
        for job, slot, n in sorted(taken, key=lambda t: t[1].seq_id):
            start, base = batch.n, len(slot.tokens)
            for i, token in enumerate(job.feed[:n]):
                batch.add(token, base + i, slot.seq_id, base + i >= job.first_output)
            plan.append((job, slot, n, start))
        return plan

    def _decode(self, n_seqs: int) -> None:
        self._batch.raw.n_tokens = self._batch.n
        rc = decode(self.ctx, self._batch.raw)
        if rc == 1 and not self.split:
            # No KV slot: our cell accounting should prevent it; free all idle caches.
            self._evict_idle()
            rc = decode(self.ctx, self._batch.raw)
        if rc != 0:
            raise LannerError(f"llama_decode failed (code {rc})")
        self.decode_calls += 1
        self.max_batch_seqs = max(self.max_batch_seqs, n_seqs)

    def _reap(self) -> None:
        for job in [j for j in self.active if j.done or j.cancelled]:
            slot = self._slot_of.pop(job)
            slot.job = None
            slot.last_used = time.monotonic()
            self.active.remove(job)
            job.free()
            job.release()

    def _fail(self, jobs: list[Job], error: LannerError) -> None:
        """End ``jobs`` with ``error``; their KV is dropped (it may be half-written)."""
        for job in jobs:
            slot = self._slot_of.get(job)
            if slot is not None:
                self._drop(slot)
            if not job.done:
                job.fail(error)
        self._reap()

    def _shutdown(self) -> None:
        with self._cv:
            self._closing = True
            waiting = list(self.waiting)
            self.waiting.clear()
        error = LannerError("the llama.cpp model was closed")
        for job in waiting:
            job.fail(error)
            job.free()
            job.release()
        self._fail(list(self.active), error)
        self._batch.free()

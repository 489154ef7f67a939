"""What the llama.cpp scheduler runs: a generation (``GenJob``) or a scoring pass
(``ScoreJob`` for ``loglikelihood``, ``PromptJob`` for ``prompt_logprobs``).

A job owns one KV sequence while it is active. The scheduler feeds ``feed`` into
the shared batch and calls ``on_output`` for every position at or past
``first_output``; the job turns those logits into tokens and events (or a score)
and posts them: onto ``out`` for the thread that asked, or, when the job has a
``sink``, to that callable (then ``None`` follows last, once the job has left
the batch). Only the scheduler thread calls a job's methods; other threads read
``out`` and set ``cancelled``.
"""

from __future__ import annotations

import codecs
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from lanner.engine.constrain import Matcher
from lanner.engine.textstream import StopBuffer
from lanner.engine.types import (
    Finish,
    FinishReason,
    Request,
    TextDelta,
    Timings,
    Token,
    TopLogprob,
    Usage,
)
from lanner.errors import LannerError

from .llamacpp_native import Vocab
from .speculative import SpecState

# Same window llama-cpp-python gives its penalties sampler (last_n_tokens_size).
PENALTY_LAST_N = 64


class Job:
    """Tokens for one KV sequence, and what to do with the logits they produce."""

    def __init__(self, tokens: list[int], first_output: int) -> None:
        self.tokens = tokens
        """The job's input: its sequence's KV cache holds these first."""
        self.feed: list[int] = list(tokens)
        """Tokens still to decode (a reused cached prefix is removed on admission)."""
        self.first_output = first_output
        """First position whose logits are needed; a cached prefix is reused only up to it."""
        self.out: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.sink: Callable[[object], None] | None = None
        """Takes the outputs instead of ``out`` (on the scheduler thread: it
        must return at once), and ``None`` when the job has left."""
        self.cancelled = False
        self.done = False
        self.released = threading.Event()
        self.submitted = time.perf_counter()
        self.draft: list[int] = []
        """Speculative tokens fed this step after the last real one (GenJob)."""

    def on_output(self, ctx: Any, index: int, pos: int) -> None:
        """Logits for ``pos`` of this sequence are at batch output ``index``."""
        raise NotImplementedError

    def wants_draft(self) -> int:
        """How many draft tokens would help this step (0: none)."""
        return 0

    def chances(self, k: int) -> list[float]:
        raise NotImplementedError

    def propose(self, k: int) -> list[int]:
        raise NotImplementedError

    def spec_history(self) -> list[int]:
        raise NotImplementedError

    def set_draft(self, draft: list[int]) -> None:
        raise NotImplementedError

    def settle(self) -> int:
        """After a step's outputs: how many of the tokens it fed (from the end)
        the sequence's KV cache must drop (a rejected draft)."""
        return 0

    def cut(self) -> None:
        """The shared KV cache is full: end now."""
        self.fail(LannerError("the model's context (shared by all requests) is full"))

    def fail(self, error: Exception) -> None:
        self.done = True
        self.post(error)

    def post(self, item: object) -> None:
        if self.sink is not None:
            self.sink(item)
        else:
            self.out.put(item)

    def release(self) -> None:
        """The job has left the batch and its slot is free (scheduler only)."""
        self.released.set()
        if self.sink is not None:
            self.sink(None)

    def free(self) -> None:
        """Release native resources; called once, by the scheduler, when the job leaves."""


def logits_row(ctx: Any, index: int, n_vocab: int) -> npt.NDArray[np.float32]:
    """A view (no copy) of the raw logits at batch output ``index``; valid until
    the next decode."""
    ptr = llama_cpp.llama_get_logits_ith(ctx, index)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,))


def log_softmax(row: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    x = row.astype(np.float64)
    x -= x.max()
    x -= np.log(np.exp(x).sum())
    return x


def top_ids(logprobs: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.intp]:
    """The ``k`` most likely ids, most likely first; ties go to the lower id,
    as llama.cpp's greedy sampler breaks them."""
    idx = np.argpartition(-logprobs, k - 1)[:k]
    return idx[np.lexsort((idx, -logprobs[idx]))]


def sampler_chain(request: Request, n_vocab: int) -> Any:
    """llama-cpp-python's chain for the same settings: penalties, then greedy, or
    top-k, top-p, min-p, temperature and a seeded draw. Penalties look at the
    last 64 generated tokens (not the prompt), as llama-cpp-python's do."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler: Any) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    r = request
    if (r.repetition_penalty, r.frequency_penalty, r.presence_penalty) != (1.0, 0.0, 0.0):
        add(llama_cpp.llama_sampler_init_penalties(
            n_vocab, PENALTY_LAST_N, r.repetition_penalty, r.frequency_penalty, r.presence_penalty
        ))
    if r.greedy:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if r.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(r.top_k))
    add(llama_cpp.llama_sampler_init_top_p(r.top_p, 1))
    add(llama_cpp.llama_sampler_init_min_p(r.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(r.temperature))
    seed = llama_cpp.LLAMA_DEFAULT_SEED if r.seed is None else r.seed  # default: random
    add(llama_cpp.llama_sampler_init_dist(seed))
    return chain


class GenJob(Job):
    """One ``stream`` request: sample with its own chain, emit safe text deltas.

    With ``spec`` it may feed a draft after its last token (``set_draft``);
    its rows are checked in order by the same chain (see ``speculative``).
    """

    def __init__(self, prompt: list[int], request: Request, vocab: Vocab, limit: int,
                 matcher: Matcher | None = None, spec: SpecState | None = None) -> None:
        super().__init__(prompt, len(prompt) - 1)
        self.request = request
        self.matcher = matcher
        """Constrained decoding: masks the logits before each sample."""
        self.vocab = vocab
        self.limit = limit
        """Most tokens to generate: max_tokens, or what is left of the context."""
        self.chain: Any = sampler_chain(request, vocab.n_vocab)
        self.argmax = request.greedy and (request.repetition_penalty, request.frequency_penalty,
                                          request.presence_penalty) == (1.0, 0.0, 0.0)
        """The chain is llama.cpp's greedy sampler alone: the first highest logit,
        taken here without the chain (which copies every logit into a candidate
        array: 81 us a row for smollm2's 49,152 tokens, 249 us for Qwen's
        151,936, against 15 and 25 us)."""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.buffer = StopBuffer(request.stop)
        self.n_generated = 0
        self.ttft: float | None = None
        self.spec = spec
        self.draft: list[int] = []
        """Tokens fed this step after the last real one, not yet checked."""
        self._draft_at = 0  # position of the last real token (row 0 of the check)
        self._accepted = 0
        self._rejected = False

    def wants_draft(self) -> int:
        """How many draft tokens would help now (0: none)."""
        spec = self.spec
        if spec is None or not spec.enabled or len(self.feed) != 1:
            return 0
        return min(spec.k, self.limit - self.n_generated - 1)

    def chances(self, k: int) -> list[float]:
        """Each of ``k`` draft tokens' chance of being right if the ones
        before it were (for the latest proposal; see ``SpecState.chances``)."""
        assert self.spec is not None
        return self.spec.chances(k)

    def propose(self, k: int) -> list[int]:
        """An n-gram draft of up to ``k`` tokens."""
        assert self.spec is not None
        return self.spec.propose(k)

    def spec_history(self) -> list[int]:
        """The prompt and the tokens emitted so far (a draft model's context)."""
        assert self.spec is not None
        return self.spec.history

    def set_draft(self, draft: list[int]) -> None:
        """Feed ``draft`` after the last real token this step."""
        self.draft = draft
        self._draft_at = len(self.tokens) + self.n_generated - 1
        self.feed.extend(draft)

    def on_output(self, ctx: Any, index: int, pos: int) -> None:
        if self._rejected:
            return  # a row after a rejected draft token: its context was wrong
        j = pos - self._draft_at if self.draft else 0
        token_id = self._sample(ctx, index)
        if token_id is None:
            return
        going = self._take(token_id, ctx, index)
        if j < len(self.draft):
            if token_id == self.draft[j]:
                self._accepted += 1
                return  # its KV cell is already right: the next row holds
            self._rejected = True
        if going:
            self.feed.append(token_id)

    def settle(self) -> int:
        """Close the step's draft round: the KV cells of its rejected tokens go."""
        if not self.draft:
            return 0
        drafted, accepted = len(self.draft), self._accepted
        assert self.spec is not None
        self.spec.settle(drafted, accepted)
        self.draft, self._accepted, self._rejected = [], 0, False
        return drafted - accepted

    def _sample(self, ctx: Any, index: int) -> int | None:
        if self.matcher is not None:
            # The sampler chain reads llama.cpp's logits buffer: mask it in place.
            self.matcher.mask_logits(logits_row(ctx, index, self.vocab.n_vocab))
        if self.argmax:
            token_id = int(np.argmax(logits_row(ctx, index, self.vocab.n_vocab)))
        else:
            token_id = llama_cpp.llama_sampler_sample(self.chain, ctx, index)
        if self.matcher is not None and not self.vocab.is_eog(token_id):
            try:
                self.matcher.accept(token_id)
            except LannerError as e:
                self.fail(e)
                return None
        return token_id

    def _take(self, token_id: int, ctx: Any, index: int) -> bool:
        """Emit one sampled token; False once the generation has finished."""
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.submitted
        if self.vocab.is_eog(token_id):
            # Like llama-cpp-python: the end-of-generation token is neither shown
            # nor counted in completion_tokens.
            self._finish("stop")
            return False
        self.n_generated += 1
        if self.spec is not None:
            self.spec.append(token_id)
        # Incremental decoding: a character split across tokens comes out whole.
        text = self.decoder.decode(self.vocab.piece(token_id))
        token = self._token(token_id, text, ctx, index)
        self._emit(self.buffer.push(text, token))
        if self.buffer.hit:
            self._finish("stop", flush=False)
        elif self.matcher is not None and self.matcher.finished:
            self._finish("stop")  # the grammar admits nothing more
        elif self.n_generated >= self.limit:
            self._finish("length")
        else:
            return True
        return False

    def cut(self) -> None:
        self._finish("length")

    def free(self) -> None:
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None

    def _token(self, token_id: int, text: str, ctx: Any, index: int) -> Token:
        if not self.request.wants_logprobs:
            return Token(token_id, text)
        # Log-softmax of the raw logits, before penalties/temperature/truncation:
        # what OpenAI and llama.cpp report.
        lp = log_softmax(logits_row(ctx, index, self.vocab.n_vocab))
        top: tuple[TopLogprob, ...] = ()
        if self.request.top_logprobs:
            top = tuple(
                TopLogprob(self.vocab.piece(int(i)).decode("utf-8", "replace"),
                           float(lp[i]), int(i))
                for i in top_ids(lp, self.request.top_logprobs)
            )
        return Token(token_id, text, float(lp[token_id]), top)

    def _emit(self, delta: TextDelta | None) -> None:
        if delta is not None:
            self.post(delta)

    def _finish(self, reason: FinishReason, flush: bool = True) -> None:
        if flush:
            tail = self.decoder.decode(b"", final=True)
            if tail:
                self._emit(self.buffer.push(tail))
            if self.buffer.hit:
                reason = "stop"
            else:
                self._emit(self.buffer.flush())
        total = time.perf_counter() - self.submitted
        spec = self.spec
        usage = Usage(prompt_tokens=len(self.tokens), completion_tokens=self.n_generated,
                      drafted_tokens=spec.drafted + len(self.draft) if spec else 0,
                      accepted_tokens=spec.accepted + self._accepted if spec else 0)
        self.post(Finish(reason, usage, Timings(self.ttft if self.ttft is not None else total,
                                                   total)))
        self.done = True


class ScoreJob(Job):
    """Sum of log P(token | everything before) over ``whole[n_context:]``, and
    whether each of those tokens is the argmax (lm-evaluation-harness)."""

    def __init__(self, whole: list[int], n_context: int, n_vocab: int) -> None:
        # The last token is only a target: its own logits are never needed.
        super().__init__(whole[:-1], n_context - 1)
        self.targets = whole
        self.n_vocab = n_vocab
        self.total = 0.0
        self.greedy = True

    def on_output(self, ctx: Any, index: int, pos: int) -> None:
        row = logits_row(ctx, index, self.n_vocab)
        target = self.targets[pos + 1]
        self.total += float(log_softmax(row)[target])
        self.greedy = self.greedy and int(np.argmax(row)) == target
        if pos + 2 == len(self.targets):
            self.post((self.total, self.greedy))
            self.done = True


class PromptJob(Job):
    """Every token of ``ids`` with log P(token | the ones before it) and its
    ``top`` most likely alternatives; the first token, with no context, gets
    None (what ``echo`` with ``logprobs`` shows)."""

    def __init__(self, ids: list[int], top: int, vocab: Vocab) -> None:
        # The last token is only a target: its own logits are never needed.
        super().__init__(ids[:-1], 0)
        self.ids = ids
        self.top = top
        self.vocab = vocab
        # Whole characters only: a token holding part of one shows "" and the
        # token that completes it shows the character, so the texts join up.
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.scored = [Token(ids[0], self.decoder.decode(vocab.piece(ids[0])))]

    def on_output(self, ctx: Any, index: int, pos: int) -> None:
        target = self.ids[pos + 1]
        lp = log_softmax(logits_row(ctx, index, self.vocab.n_vocab))
        top = tuple(TopLogprob(self.vocab.piece(int(i)).decode("utf-8", "replace"),
                               float(lp[i]), int(i))
                    for i in (top_ids(lp, self.top) if self.top else ()))
        last = pos + 2 == len(self.ids)
        text = self.decoder.decode(self.vocab.piece(target), final=last)
        self.scored.append(Token(target, text, float(lp[target]), top))
        if last:
            self.post(self.scored)
            self.done = True

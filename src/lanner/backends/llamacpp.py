"""The llama.cpp backend: GGUF models through llama-cpp-python's low-level API.

Several threads may call ``stream`` at once: one scheduler thread owns the
llama.cpp context and decodes every active sequence together, one batch per step
(continuous batching, see ``llamacpp_sched``). Sampling runs inside llama.cpp's
sampler chains, so a token costs no per-vocabulary Python work unless logprobs
were asked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from lanner.backends import rope
from lanner.backends.base import ModelMetadata
from lanner.engine.constrain import Matcher
from lanner.engine.types import Event, Finish, Request, Token
from lanner.errors import BackendUnavailable, ContextLengthExceeded, InvalidRequest, LannerError

try:
    import llama_cpp
except ImportError as e:  # pragma: no cover - llama-cpp-python is a core dependency
    raise BackendUnavailable(
        f"the llama.cpp backend needs llama-cpp-python (pip install llama-cpp-python): {e}"
    ) from e

from . import speculative
from .llamacpp_jobs import GenJob, Job, PromptJob, ScoreJob
from .llamacpp_native import (
    LOAD_OPTIONS,
    ContextConfig,
    Vocab,
    create_context,
    kv_cell_bytes,
    load_model,
    meta_str,
)
from .llamacpp_sched import Scheduler
from .speculative import AcceptStats, DraftModel, SpecState

DEFAULT_MAX_CTX = 8192
"""Default context: the model's training context, but at most this (KV memory)."""

KV_LAYOUTS = ("unified", "split", "auto")
DEFAULT_SPECULATIVE = "off"
"""Chosen by benchmarks/speculative.py and benchmarks/startup.py (docs/benchmarks.md).
N-gram drafts now pay on one stream of the bundled model (grounded 1.5-1.67x,
open-ended 1.2-1.3x on an AVX2 VM), but not yet everywhere a default reaches:
a one-shot `lanner run` pays for learning what steps cost (0.76x a plain
script on the Q4_1 file when `ngram` was the default); quantised files whose
batched steps cost 1.6-3x a one-token step gain little (Qwen2.5-Coder Q4_K_M:
open-ended 0.98x); and except with packed BF16 weights a batched row rounds
apart from a one-token step, so greedy text may part from plain decoding at a
near tie."""

# Extra keyword options and their defaults.
_OPTIONS: dict[str, int | bool | str] = {
    "n_batch": 512,  # tokens per llama_decode step (prompt chunks + one per sequence)
    "n_ubatch": 512,
    # On: a sequence's numbers do not depend on what else shares the batch or the
    # cache, so batched == alone. Off matches a default llama_cpp.Llama exactly.
    "flash_attn": True,
    **LOAD_OPTIONS,  # n_gpu_layers, use_mmap
    # KV cache layout (see llamacpp_native.create_context): "unified" shares
    # n_ctx cells among all sequences; "split" gives each its own n_ctx cells;
    # "auto" splits when that fits kv_budget_mib.
    "kv": "unified",
    "kv_budget_mib": 0,  # 0: a quarter of this machine's memory, at most 4 GiB
    # Speculative decoding (see speculative.py): "ngram", "off" or "draft:PATH"
    # (the engine turns draft:NAME into the draft model's file).
    "speculative": DEFAULT_SPECULATIVE,
}


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = dict(_OPTIONS)
    for key, value in kwargs.items():
        if key not in _OPTIONS:
            raise InvalidRequest(key, f"unknown llama.cpp option (known: {', '.join(_OPTIONS)})")
        default = _OPTIONS[key]
        if type(value) is not type(default):
            raise InvalidRequest(key, f"must be {type(default).__name__}, got {value!r}")
        opts[key] = value
    for key in ("n_batch", "n_ubatch"):
        if opts[key] < 1:
            raise InvalidRequest(key, f"must be >= 1, got {opts[key]}")
    if opts["kv"] not in KV_LAYOUTS:
        raise InvalidRequest("kv", f"must be one of {', '.join(KV_LAYOUTS)}, got {opts['kv']!r}")
    if opts["kv_budget_mib"] < 0:
        raise InvalidRequest("kv_budget_mib", f"must be >= 0, got {opts['kv_budget_mib']}")
    speculative.parse(opts["speculative"])
    return opts


def default_kv_budget() -> int:
    """Bytes the "auto" layout may give the KV cache: a quarter of physical
    memory, at most 4 GiB."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        ram = 8 << 30
    return min(ram // 4, 4 << 30)


def split_fits(cell_bytes: int, n_ctx: int, n_seq_max: int, budget: int) -> bool:
    """Whether ``n_seq_max`` sequences of ``n_ctx`` cells each fit ``budget`` bytes."""
    return cell_bytes * n_ctx * n_seq_max <= budget


def _positive(field: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidRequest(field, f"must be a positive integer, got {value!r}")


class LlamaCppBackend:
    """A GGUF model in llama.cpp, serving up to ``n_seq_max`` streams at once.

    ``n_ctx`` is both the longest sequence (prompt + completion) and the KV cells
    all concurrent sequences share. Extra options (``**kwargs``): ``n_batch``,
    ``n_ubatch``, ``flash_attn``, ``n_gpu_layers``, ``use_mmap``; anything else is
    an ``InvalidRequest`` naming it. ``kv``: "unified" (default), "split" or
    "auto" (split when ``n_seq_max * n_ctx`` cells fit ``kv_budget_mib``; the
    chosen layout is ``kv_layout``). Metrics: ``queue_depth``, ``active_sequences``,
    ``max_batch_seqs``, ``decode_calls``, ``reused_tokens`` (or ``stats()``).
    ``rope_scaling`` "linear" | "yarn" with ``rope_factor`` stretches the
    trained context (see ``rope``); the default window grows by the factor.
    """

    name = "llama.cpp"
    version: str = llama_cpp.__version__

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_seq_max: int = 16,
        rope_scaling: str | None = None,
        rope_factor: float | None = None,
        **kwargs: Any,
    ) -> None:
        _positive("n_ctx", n_ctx)
        _positive("n_threads", n_threads)
        _positive("n_seq_max", n_seq_max)
        if n_seq_max > llama_cpp.llama_max_parallel_sequences():
            raise InvalidRequest("n_seq_max", f"at most {llama_cpp.llama_max_parallel_sequences()}")
        opts = _options(kwargs)
        self.path = Path(path)
        self._closed = False
        self._ctx: Any = None
        self._draft: DraftModel | None = None
        self._ll_tokenizer: Any = None
        self._model = load_model(self.path, n_gpu_layers=opts["n_gpu_layers"],
                                 use_mmap=opts["use_mmap"])
        try:
            self._vocab = Vocab(self._model)
            n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self._model))
            self.rope_scaling = rope.resolve(rope_scaling, rope_factor, n_ctx, n_ctx_train)
            if self.rope_scaling is not None:
                arch = meta_str(self._model, "general.architecture")
                rope.check_unscaled(meta_str(self._model, f"{arch}.rope.scaling.type"))
            window = n_ctx or rope.default_window(n_ctx_train, DEFAULT_MAX_CTX, self.rope_scaling)
            split = opts["kv"] == "split"
            if opts["kv"] == "auto":
                budget = opts["kv_budget_mib"] << 20 or default_kv_budget()
                split = split_fits(kv_cell_bytes(self._model), window, n_seq_max, budget)
            self.kv_layout = "split" if split else "unified"
            cfg = ContextConfig(
                n_ctx=window,
                n_batch=opts["n_batch"],
                n_ubatch=opts["n_ubatch"],
                n_seq_max=n_seq_max,
                n_threads=n_threads or os.cpu_count() or 1,
                flash_attn=opts["flash_attn"],
                split_kv=split,
                rope=self.rope_scaling,
            )
            self._ctx = create_context(self._model, cfg, self.path)
            # The longest sequence (llama.cpp may round the window up).
            self.n_ctx: int = int(llama_cpp.llama_n_ctx_seq(self._ctx))
            self.n_seq_max = n_seq_max
            self.kv_bytes = kv_cell_bytes(self._model) * int(llama_cpp.llama_n_ctx(self._ctx))
            """The KV cache's size (an estimate: F16 keys and values)."""
            self.n_threads = cfg.n_threads
            self.metadata = self._read_metadata(n_ctx_train)
            # llama.cpp may round n_ctx up and clamp n_batch to it: use what it chose.
            n_batch = int(llama_cpp.llama_n_batch(self._ctx))
            self.speculative, draft_path = speculative.parse(opts["speculative"])
            """How requests draft: "ngram", "draft" (a draft model) or "off"."""
            self._accept_stats = AcceptStats()
            """How often drafts were right, per match length, over all requests."""
            if draft_path is not None:
                self._draft = DraftModel(Path(draft_path), self._vocab, n_ctx=self.n_ctx,
                                         n_seq_max=n_seq_max, n_threads=cfg.n_threads,
                                         n_batch=n_batch)
            self._sched = Scheduler(self._ctx, n_ctx=self.n_ctx, n_batch=n_batch,
                                    n_seq_max=n_seq_max, split=split, draft_model=self._draft)
        except BaseException:
            self._free_native()
            raise

    # -- metrics ---------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a free sequence slot."""
        return len(self._sched.waiting)

    @property
    def active_sequences(self) -> int:
        """Requests holding a sequence slot (prefilling or generating)."""
        return len(self._sched.active)

    @property
    def max_batch_seqs(self) -> int:
        """Most sequences decoded together in one llama_decode call so far."""
        return self._sched.max_batch_seqs

    @property
    def decode_calls(self) -> int:
        return self._sched.decode_calls

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens served from a cached prefix instead of being decoded."""
        return self._sched.reused_tokens

    @property
    def drafted_tokens(self) -> int:
        """Speculative draft tokens checked by the model."""
        return self._sched.drafted_tokens

    @property
    def accepted_tokens(self) -> int:
        """Draft tokens that were what the model itself sampled."""
        return self._sched.accepted_tokens

    @property
    def step_seconds(self) -> dict[int, float]:
        """What a step of n tokens has cost lately, by n (the sizes seen so far;
        what drafts are sized by, ``StepCosts``)."""
        seconds = self._sched.step_costs.seconds
        return {n: s for n, s in enumerate(seconds) if s is not None}

    def stats(self) -> dict[str, float]:
        drafted = self.drafted_tokens
        return {
            "queue_depth": self.queue_depth,
            "active_sequences": self.active_sequences,
            "max_batch_seqs": self.max_batch_seqs,
            "decode_calls": self.decode_calls,
            "reused_tokens": self.reused_tokens,
            "spec_drafted_tokens": drafted,
            "spec_accepted_tokens": self.accepted_tokens,
            "spec_acceptance_rate": round(self.accepted_tokens / drafted, 4) if drafted else 0.0,
        }

    # -- Backend ---------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        self._check_open()
        return self._vocab.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        """llama_detokenize: BOS/EOS kept, special tokens rendered as nothing."""
        self._check_open()
        self._check_ids("ids", ids)
        return self._vocab.detokenize(ids)

    def stream(self, request: Request) -> Generator[Event, None, None]:
        """Validate now (raising ``ContextLengthExceeded``/``InvalidRequest`` at the
        call), then generate lazily: nothing runs until the first ``next``."""
        prompt, limit = self._checked(request)
        return self._events(prompt, request, limit)

    def stream_to(self, request: Request, sink: Callable[[object], None]) -> Callable[[], None]:
        """Generate for ``request`` with no thread of the caller's waiting on it.

        ``sink`` gets each Event, or the Exception that ends the stream, then
        ``None`` once the request has left the batch; it is called on the
        scheduler thread and must return at once (a server hands the item to
        its event loop). Validation errors raise here. Returns ``stop``, which
        makes the request leave at the next step and returns at once.
        """
        prompt, limit = self._checked(request)
        job = self._gen_job(prompt, request, limit)
        job.sink = sink
        try:
            self._sched.submit(job)
        except BaseException:
            job.free()
            raise
        return lambda: self._sched.cancel(job, wait=False)

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """lm-evaluation-harness: trailing spaces of the context move to the
        continuation; context + continuation are tokenized together (BOS where
        the model adds one) and the continuation is every token past the
        context's own tokens. An empty context conditions on BOS (else EOS)."""
        self._check_open()
        n_context, whole = self._score_tokens(context, continuation)
        if len(whole) <= n_context:
            raise InvalidRequest("continuation", "adds no tokens to the context")
        if len(whole) > self.n_ctx:
            raise ContextLengthExceeded(len(whole), self.n_ctx)
        total, greedy = cast(tuple[float, bool],
                             self._result(ScoreJob(whole, n_context, self._vocab.n_vocab)))
        return total, greedy

    def loglikelihood_batch(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """``loglikelihood`` of many pairs, those of one context one after another:
        each reuses the slot that holds the context, so it is decoded once.

        One at a time on purpose: prompt decoding is compute-bound on a CPU, so
        decoding several contexts in one batch gains nothing, and in a unified
        cache every token then attends over all of their cells (measured: 40
        four-choice questions in 12.3 s batched, 7.9 s one after another)."""
        order = sorted(range(len(pairs)), key=lambda i: pairs[i][0])  # same contexts together
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for i in order:
            out[i] = self.loglikelihood(*pairs[i])
        return out

    def prompt_logprobs(self, ids: Sequence[int], top: int = 0) -> list[Token]:
        """Each token of ``ids`` with log P(token | the tokens before it) and its
        ``top`` most likely alternatives, in one batched pass; the first token
        has no context and gets None."""
        self._check_open()
        ids = list(ids)
        self._check_ids("prompt", ids)
        if not ids:
            raise InvalidRequest("prompt", "must not be empty")
        if len(ids) > self.n_ctx:
            raise ContextLengthExceeded(len(ids), self.n_ctx)
        if not 0 <= top <= 20:
            raise InvalidRequest("top_logprobs", f"must be in [0, 20], got {top}")
        job = PromptJob(ids, top, self._vocab)
        if len(ids) == 1:
            return job.scored
        return cast(list[Token], self._result(job))

    def close(self) -> None:
        """Stop the scheduler (pending requests fail) and free the model."""
        if self._closed:
            return
        self._closed = True
        self._sched.close()
        self._free_native()

    def __enter__(self) -> LlamaCppBackend:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------

    def _result(self, job: Job) -> object:
        """Run a scoring job to its one result."""
        self._sched.submit(job)
        try:
            result = self._sched.next_event(job)
        finally:
            self._sched.cancel(job)
        if isinstance(result, Exception):
            raise result
        return result

    def _checked(self, request: Request) -> tuple[list[int], int]:
        """The prompt's ids and the most tokens it may generate."""
        self._check_open()
        prompt = self._prompt_ids(request)
        if len(prompt) >= self.n_ctx:
            raise ContextLengthExceeded(len(prompt), self.n_ctx)
        limit = self.n_ctx - len(prompt)
        if request.max_tokens is not None:
            limit = min(limit, request.max_tokens)
        return prompt, limit

    def _gen_job(self, prompt: list[int], request: Request, limit: int) -> GenJob:
        matcher = None
        if request.constraint is not None:  # compiled here, not in the scheduler thread
            matcher = Matcher(self._grammar_tokenizer(), request.constraint, self._vocab.n_vocab)
        spec = None
        if self.speculative != "off":
            spec = SpecState(self.speculative, list(prompt), self._accept_stats)
        return GenJob(prompt, request, self._vocab, limit, matcher, spec)

    def _events(
        self, prompt: list[int], request: Request, limit: int
    ) -> Generator[Event, None, None]:
        job = self._gen_job(prompt, request, limit)
        try:
            self._sched.submit(job)
        except BaseException:
            job.free()
            raise
        try:
            while True:
                event = self._sched.next_event(job)
                if isinstance(event, Exception):
                    raise event
                yield cast(Event, event)
                if isinstance(event, Finish):
                    return
        finally:
            # Early close (client gone): leave the batch and free the slot now.
            self._sched.cancel(job)

    def _grammar_tokenizer(self) -> Any:
        """llguidance's view of this vocabulary (built once: ~1 s for 49k tokens)."""
        if self._ll_tokenizer is None:
            from llguidance.llamacpp import lltokenizer_from_vocab

            eog = [t for t in (self._vocab.eos, llama_cpp.llama_vocab_eot(self._vocab.ptr))
                   if t >= 0]
            self._ll_tokenizer = lltokenizer_from_vocab(self._vocab.ptr, eos_token=eog)
        return self._ll_tokenizer

    def _prompt_ids(self, request: Request) -> list[int]:
        if isinstance(request.prompt, str):
            ids = self.tokenize(request.prompt, add_bos=True, special=False)
        else:
            ids = list(request.prompt)
            self._check_ids("prompt", ids)
        if not ids:
            raise InvalidRequest("prompt", "must not be empty")
        return ids

    def _score_tokens(self, context: str, continuation: str) -> tuple[int, list[int]]:
        if not context:
            prefix = self._vocab.bos if self._vocab.bos >= 0 else self._vocab.eos
            return 1, [prefix, *self.tokenize(continuation, add_bos=False)]
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        n_context = len(self.tokenize(context))
        return n_context, self.tokenize(context + continuation)

    def _check_open(self) -> None:
        # The vocabulary lives in the model: using it after close would crash.
        if self._closed:
            raise LannerError(f"the model {self.path.name} has been closed")

    def _check_ids(self, field: str, ids: Sequence[int]) -> None:
        # An out-of-range id would make llama.cpp abort the whole process.
        n = self._vocab.n_vocab
        bad = next((i for i in ids if not 0 <= i < n), None)
        if bad is not None:
            raise InvalidRequest(field, f"token id {bad} is outside the vocabulary (0-{n - 1})")

    def _read_metadata(self, n_ctx_train: int) -> ModelMetadata:
        m = self._model
        return ModelMetadata(
            architecture=meta_str(m, "general.architecture") or "unknown",
            chat_template=meta_str(m, "tokenizer.chat_template"),
            bos_token=self._vocab.text_of(self._vocab.bos),
            eos_token=self._vocab.text_of(self._vocab.eos),
            n_ctx_train=n_ctx_train,
            extra={
                "name": meta_str(m, "general.name"),
                "n_params": int(llama_cpp.llama_model_n_params(m)),
                "size_bytes": int(llama_cpp.llama_model_size(m)),
                "n_vocab": self._vocab.n_vocab,
                "file_type": meta_str(m, "general.file_type"),
            },
        )

    def _free_native(self) -> None:
        if self._draft is not None:
            self._draft.close()
            self._draft = None
        # The context must go before its model.
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None

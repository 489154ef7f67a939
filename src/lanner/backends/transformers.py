"""Run Hugging Face causal LMs with PyTorch: a safetensors folder, or a GGUF file
dequantised once into a cached safetensors folder (see ``gguf_convert``).

Each request is an ``hf_run.Run`` (sampling state, text, stop strings), decoded
with others in one forward pass by ``hf_batching`` on an ``hf_slots`` cache, or
alone on transformers' ``DynamicCache`` (``hf_run.decode_alone``) for models
that cache cannot describe. Model calls run under ``torch.inference_mode`` one
call at a time, never across a ``yield``, so the caller's code never runs in
that mode.
"""

from __future__ import annotations

import copy
import inspect
import queue
from collections.abc import Callable, Generator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from lanner.backends import hf_decode, hf_quant, hf_weights, rope
from lanner.backends.base import ModelMetadata
from lanner.backends.gguf_convert import converted_folder, read_manifest
from lanner.backends.hf_adapters import Adapters, chat_template
from lanner.backends.hf_batching import Job, Scheduler
from lanner.backends.hf_run import IncrementalDetokenizer, Run, decode_alone
from lanner.backends.hf_slots import SlotCache, causal_mask, supports_slots
from lanner.engine.constrain import Matcher
from lanner.engine.types import Event, Request, Token, TopLogprob
from lanner.errors import ContextLengthExceeded, InvalidRequest, ModelLoadError, ModelNotFound

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAX_DEFAULT_CTX = 8192
_FALLBACK_CTX = 2048  # configs that name no context length (rare; old GPT-style models)
_DEFAULT_SLOTS = 16  # requests decoded together; more wait their turn


class TransformersBackend:
    """A loaded Hugging Face model. ``path`` is a model folder or a ``.gguf`` file.

    ``dtype``: "float32" | "bfloat16" | "float16" | "auto" (float32 on CPU,
    bfloat16 on CUDA). ``device``: "auto" (CUDA if available) or a torch device
    string. ``n_ctx`` defaults to the model's trained context, at most 8192.
    ``cache_dir`` is where GGUF conversions live (default ``<home>/converted``).
    ``adapter``: a peft LoRA folder loaded on top (its chat template, if it
    ships one, is the one it was trained with and replaces the model's);
    ``add_adapter`` gives more adapters on the same weights. Up to ``n_seq_max``
    requests are decoded together (``hf_batching``); more wait their turn.
    Raises ``ModelNotFound`` for a missing path, ``ModelLoadError`` for one that
    cannot be loaded, ``InvalidRequest`` for a bad dtype/device/n_ctx.
    ``rope_scaling`` "linear" | "yarn" with ``rope_factor`` stretches the
    trained context (see ``rope``); the default window grows by the factor.
    """

    name = "transformers"
    version = transformers.__version__

    def __init__(
        self,
        path: Path,
        *,
        dtype: str = "auto",
        device: str = "auto",
        n_ctx: int | None = None,
        cache_dir: Path | None = None,
        adapter: str | Path | None = None,
        n_seq_max: int = _DEFAULT_SLOTS,
        rope_scaling: str | None = None,
        rope_factor: float | None = None,
        quant: str | None = None,
    ) -> None:
        path = Path(path).expanduser()
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        _check_n_ctx(n_ctx)
        _check_positive("n_seq_max", n_seq_max)
        self.folder = _model_folder(path, cache_dir)
        scaled = rope.hf_config(self.folder, rope_scaling, rope_factor, n_ctx)
        self.rope_scaling = scaled[1] if scaled else None
        self.quant = quant  # --quant int8|int4: see hf_quant
        self.model, self.tokenizer = _load(self.folder, self.dtype, self.device,
                                           scaled[0] if scaled else None, quant)
        # On a CPU, weights laid out for matrix-vector speed (see hf_weights).
        self.weight_layout = hf_weights.prepare(self.model) if quant is None else None
        config = self.model.config.get_text_config()
        n_ctx_train = (self.rope_scaling.original_context if self.rope_scaling
                       else _trained_context(config))
        self.n_ctx = n_ctx if n_ctx is not None else rope.default_window(
            n_ctx_train, _MAX_DEFAULT_CTX, self.rope_scaling)
        self.metadata = self._metadata(config.model_type, n_ctx_train)
        self._adapters = Adapters(self.model)
        self._adapter: str | None = None
        if adapter is not None:
            self._use_adapter(self._adapters.add(adapter, "adapter"))
        self._eos_ids = _eos_ids(self.model, self.tokenizer)
        self._bos_id: int | None = self.tokenizer.bos_token_id
        self._adds_bos = self._bos_id is not None and _adds_bos(self.tokenizer, self._bos_id)
        self._vocab_size = int(self.model.get_input_embeddings().num_embeddings)
        self._ll_tokenizer: Any = None
        self._cache_kwarg = _cache_kwarg(self.model)
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._lean_decode = hf_decode.supports(self.model)  # one-token passes: see hf_decode
        self._scheduler: Scheduler | None = None
        if supports_slots(config, self.n_ctx):
            self._scheduler = Scheduler(self._forward_rows, n_seq_max, self.device)
        self.n_seq_max = n_seq_max if self._scheduler is not None else 1
        """How many requests decode together (callers such as the eval runner
        send that many at once); 1 for a model that decodes one at a time."""

    def _metadata(self, architecture: str, n_ctx_train: int) -> ModelMetadata:
        template = self.tokenizer.chat_template
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        extra: dict[str, object] = {
            "path": str(self.folder), "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device), "quant": hf_quant.describe(self.quant, self.device),
            "weight_layout": self.weight_layout,
        }
        manifest = read_manifest(self.folder)
        if manifest:
            extra["converted_from"] = manifest.get("source")
            extra["gguf_sha256"] = manifest.get("sha256")
        return ModelMetadata(
            architecture=architecture, chat_template=template,
            bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token,
            n_ctx_train=n_ctx_train, extra=extra,
        )

    def add_adapter(self, path: str | Path, name: str) -> TransformersBackend:
        """A backend for the LoRA adapter at ``path`` that shares this one's
        weights (and lock); this backend keeps running the model as it was."""
        view = copy.copy(self)
        view._use_adapter(self._adapters.add(path, name))
        return view

    def _use_adapter(self, name: str) -> None:
        folder = self._adapters.names[name]
        extra = {**self.metadata.extra, "adapter": str(folder)}
        template = chat_template(folder) or self.metadata.chat_template
        self.metadata = replace(self.metadata, chat_template=template, extra=extra)
        self._adapter = name

    # -- text <-> ids ------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of ``text``; BOS only if ``add_bos`` and the model's tokenizer
        adds one; special-token text is parsed only if ``special``."""
        ids: list[int] = self.tokenizer.encode(
            text, add_special_tokens=False, split_special_tokens=not special
        )
        if add_bos and self._adds_bos and self._bos_id is not None:
            return [self._bos_id, *ids]
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens written out."""
        text: str = self.tokenizer.decode(
            list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        return text

    # -- generation --------------------------------------------------------

    def stream(self, request: Request) -> Generator[Event, None, None]:
        """Generate for ``request``. The prompt is checked now (``InvalidRequest``,
        ``ContextLengthExceeded``); tokens come as the returned iterator is read."""
        run = self._run(request)
        if self._scheduler is None:
            return decode_alone(run, self._forward, self._new_cache)
        return self._batched(run)

    def _grammar_tokenizer(self) -> Any:
        """llguidance's view of the vocabulary, built once."""
        if self._ll_tokenizer is None:
            from llguidance.hf import from_tokenizer

            self._ll_tokenizer = from_tokenizer(self.tokenizer, n_vocab=self._vocab_size,
                                                eos_token=sorted(self._eos_ids))
        return self._ll_tokenizer

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, add_bos=True, special=False)
        else:
            ids = list(prompt)
            bad = next((i for i in ids if i >= self._vocab_size), None)
            if bad is not None:
                raise InvalidRequest(
                    "prompt", f"token id {bad} is outside the vocabulary (size {self._vocab_size})"
                )
        if not ids:
            raise InvalidRequest("prompt", "tokenizes to no tokens")
        return ids

    @property
    def stream_to(self) -> Callable[[Request, Callable[[object], None]], Callable[[], None]] | None:
        """``_stream_to`` when requests are decoded together, else None (the
        server then runs each stream in a thread of its own)."""
        return self._stream_to if self._scheduler is not None else None

    def _stream_to(self, request: Request, sink: Callable[[object], None]) -> Callable[[], None]:
        """Generate for ``request`` in the batch, with no thread of the caller's
        waiting on it (the server's streams, as llama.cpp's ``stream_to``).

        ``sink`` gets each Event, or the exception that ends the stream, then
        ``None`` once the request has left the batch; it is called on the
        scheduler thread and must return at once. Validation errors raise here.
        Returns ``stop``, which makes the request leave at the next step."""
        scheduler = self._scheduler
        assert scheduler is not None
        run = self._run(request)
        run.restart_clock()
        job = Job(run, sink)
        scheduler.submit(job)
        return lambda: scheduler.cancel(job)

    def stats(self) -> dict[str, int]:
        scheduler = self._scheduler
        if scheduler is None:
            return {}
        return {"queue_depth": len(scheduler.waiting), "active_sequences": len(scheduler.active),
                "max_batch_seqs": scheduler.max_batch, "decode_steps": scheduler.steps}

    def _run(self, request: Request) -> Run:
        prompt_ids = self._prompt_ids(request.prompt)
        room = self.n_ctx - len(prompt_ids)
        if room < 1:
            raise ContextLengthExceeded(len(prompt_ids), self.n_ctx)
        limit = room if request.max_tokens is None else min(room, request.max_tokens)
        matcher = None
        if request.constraint is not None:
            matcher = Matcher(self._grammar_tokenizer(), request.constraint, self._vocab_size)
        return Run(self, request, prompt_ids, limit, matcher)

    def _batched(self, run: Run) -> Generator[Event, None, None]:
        """The request through the scheduler, its events read here."""
        assert self._scheduler is not None
        items: queue.SimpleQueue[object] = queue.SimpleQueue()
        job = Job(run, items.put)
        run.restart_clock()
        self._scheduler.submit(job)
        try:
            while (item := items.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            # A consumer that stops reading early frees the request's slot.
            self._scheduler.cancel(job, wait=True)

    @torch.inference_mode()
    def _forward_rows(self, adapter: str | None, cache: SlotCache, rows: list[int],
                      ids: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Float32 logits (B, V) of each row's last token; ``ids`` and
        ``positions`` (B, T) go into ``cache`` rows ``rows``; ``kv_len`` is the
        largest position + 1."""
        cache.bind(rows, positions, kv_len)
        if self._lean_decode and ids.shape[1] == 1:
            full = bool((positions == kv_len - 1).all())  # every row sees every column
            lean_mask = None if full else causal_mask(positions, kv_len, self.model.dtype)
            with self._adapters.use(adapter):
                return hf_decode.decode_step(self.model, ids, positions, cache, lean_mask,
                                             modules_only=bool(self._adapters.names))
        mask = causal_mask(positions, kv_len, self.model.dtype)
        kwargs: dict[str, Any] = {self._cache_kwarg: cache, "use_cache": True}
        if self._keeps_logits:
            kwargs["logits_to_keep"] = 1
        with self._adapters.use(adapter):
            out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask,
                             **kwargs)
        return out.logits[:, -1].float()

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def _forward(self, ids: torch.Tensor, start: int, cache: DynamicCache | None) -> torch.Tensor:
        """Logits (T', V) of ``ids`` (1, T) at positions ``start..start+T-1``; with a
        cache, only the last position's logits (T' = 1) are computed."""
        positions = torch.arange(start, start + ids.shape[1], device=self.device)[None]  # (1, T)
        kwargs: dict[str, Any] = {self._cache_kwarg: cache, "use_cache": cache is not None}
        if cache is not None and self._keeps_logits:
            kwargs["logits_to_keep"] = 1
        with self._adapters.use(self._adapter):
            out = self.model(input_ids=ids, position_ids=positions, **kwargs)
        return out.logits[0]

    def _token(
        self, token_id: int, text: str, logprob: float | None, top: list[tuple[int, float]]
    ) -> Token:
        alternatives = tuple(TopLogprob(self.detokenize([i]), lp, i) for i, lp in top)
        return Token(token_id, text, logprob, alternatives)

    # -- scoring -----------------------------------------------------------

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """Sum of log P(continuation | context) and whether every continuation
        token is the argmax (lm-evaluation-harness ``loglikelihood``).

        Tokenized as lm-eval does: trailing spaces of the context move to the
        continuation; the continuation is what ``context + continuation`` adds
        to the context's tokens. An empty context is conditioned on BOS (or EOS).
        Too long a pair keeps its most recent ``n_ctx`` tokens.
        """
        context_ids, continuation_ids = self._encode_pair(context, continuation)
        if not continuation_ids:
            return 0.0, True
        if len(continuation_ids) > self.n_ctx:
            raise ContextLengthExceeded(len(continuation_ids), self.n_ctx)
        ids = (context_ids + continuation_ids)[-(self.n_ctx + 1) :]
        return self._score(ids[:-1], continuation_ids)

    @torch.inference_mode()
    def prompt_logprobs(self, ids: Sequence[int], top: int = 0) -> list[Token]:
        """Each token of ``ids`` with log P(token | the tokens before it) and its
        ``top`` most likely alternatives, in one forward pass; the first token
        has no context and gets None. Texts are whole characters (a token
        holding part of one shows ""), so they join up to the prompt's text."""
        ids = self._prompt_ids(ids)
        if len(ids) > self.n_ctx:
            raise ContextLengthExceeded(len(ids), self.n_ctx)
        if not 0 <= top <= 20:
            raise InvalidRequest("top_logprobs", f"must be in [0, 20], got {top}")
        texts = IncrementalDetokenizer(self.detokenize, [])
        out = [self._token(ids[0], texts.push(ids[0]), None, [])]
        if len(ids) > 1:
            logits = self._forward(torch.tensor([ids[:-1]], device=self.device), 0, None)
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # row k predicts ids[k + 1]
            for k, token_id in enumerate(ids[1:]):
                alternatives: list[tuple[int, float]] = []
                if top:
                    values, best = torch.topk(logprobs[k], top)
                    alternatives = list(zip(best.tolist(), values.tolist(), strict=True))
                out.append(self._token(token_id, texts.push(token_id),
                                       float(logprobs[k, token_id]), alternatives))
        tail = texts.flush()
        if tail:
            last = out[-1]
            out[-1] = Token(last.id, last.text + tail, last.logprob, last.top)
        return out

    def loglikelihood_batch(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """``loglikelihood`` of many pairs; pairs with the same context tokens
        share one forward pass over it and all their continuations."""
        encoded = [self._encode_pair(c, x) for c, x in pairs]
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (context_ids, continuation_ids) in enumerate(encoded):
            if not continuation_ids:
                continue
            if len(context_ids) + len(continuation_ids) > self.n_ctx + 1:
                out[i] = self.loglikelihood(*pairs[i])  # truncated as lm-eval truncates
            else:
                groups.setdefault(tuple(context_ids), []).append(i)
        for shared, members in groups.items():
            scored = self._score_shared(list(shared), [encoded[i][1] for i in members])
            for i, result in zip(members, scored, strict=True):
                out[i] = result
        return out

    @torch.inference_mode()
    def _score_shared(
        self, context: list[int], continuations: list[list[int]]
    ) -> list[tuple[float, bool]]:
        """One forward pass over the context followed by every continuation (but
        its last token, only a target), each attending to the context and to
        itself: a 4D mask, positions restarting after the context for each."""
        tails = [c[:-1] for c in continuations]
        n_ctx, n = len(context), len(context) + sum(len(t) for t in tails)
        allowed = torch.zeros(n, n, dtype=torch.bool)
        allowed[:n_ctx, :n_ctx] = torch.ones(n_ctx, n_ctx, dtype=torch.bool).tril()
        positions, start = list(range(n_ctx)), n_ctx
        for tail in tails:
            end = start + len(tail)
            allowed[start:end, :n_ctx] = True
            allowed[start:end, start:end] = torch.ones(end - start, end - start).tril().bool()
            positions += range(n_ctx, n_ctx + len(tail))
            start = end
        dtype = self.model.dtype
        mask = torch.zeros(n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        keep = torch.arange(n_ctx - 1, n)  # rows predicting continuation tokens
        ids = [*context, *(t for tail in tails for t in tail)]
        kwargs: dict[str, Any] = {"logits_to_keep": keep} if self._keeps_logits else {}
        out = self.model(input_ids=torch.tensor([ids], device=self.device),
                         position_ids=torch.tensor([positions], device=self.device),
                         attention_mask=mask[None, None].to(self.device), use_cache=False,
                         **kwargs)
        logits = out.logits[0] if self._keeps_logits else out.logits[0, n_ctx - 1 :]
        rows = torch.log_softmax(logits.float(), dim=-1)  # row 0 predicts every first token
        results, start = [], 1
        for continuation in continuations:
            k = len(continuation) - 1
            logprobs = torch.cat([rows[:1], rows[start : start + k]])  # (C, V)
            start += k
            target = torch.tensor(continuation, device=self.device)
            total = float(logprobs.gather(1, target[:, None]).sum())
            results.append((total, bool((logprobs.argmax(dim=-1) == target).all())))
        return results

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            prefix = self._bos_id if self._bos_id is not None else next(iter(self._eos_ids), 0)
            return [prefix], self.tokenize(continuation, add_bos=False)
        whole = self.tokenize(context + continuation, add_bos=True)
        context_ids = self.tokenize(context, add_bos=True)
        return context_ids, whole[len(context_ids) :]

    @torch.inference_mode()
    def _score(self, inputs: list[int], targets: list[int]) -> tuple[float, bool]:
        logits = self._forward(torch.tensor([inputs], device=self.device), 0, None)  # (T, V)
        logprobs = torch.log_softmax(logits[-len(targets) :].float(), dim=-1)  # (C, V)
        target = torch.tensor(targets, device=self.device)
        total = logprobs.gather(1, target[:, None]).sum()
        greedy = bool((logprobs.argmax(dim=-1) == target).all())
        return float(total), greedy

    def close(self) -> None:
        """Drop the model and tokenizer; the backend cannot be used afterwards."""
        if self._scheduler is not None:
            self._scheduler.close()
        self.model = None
        self.tokenizer = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# -- loading -----------------------------------------------------------------


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidRequest("device", f"unknown device {device!r}") from exc


def _check_n_ctx(n_ctx: object) -> None:
    if n_ctx is not None:
        _check_positive("n_ctx", n_ctx)


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(name, f"must be a positive integer, got {value!r}")


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise InvalidRequest("dtype", f"must be auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def _model_folder(path: Path, cache_dir: Path | None) -> Path:
    """The safetensors folder to load: ``path`` itself, or its GGUF conversion."""
    if not path.exists():
        raise ModelNotFound(f"no such file or folder: {path}")
    if path.is_dir():
        return path
    if path.suffix.lower() != ".gguf":
        raise ModelLoadError(f"{path}: not a .gguf file or a Hugging Face model folder")
    return converted_folder(path, cache_dir)


def _load(folder: Path, dtype: torch.dtype, device: torch.device,
          config: Any = None, quant: str | None = None) -> tuple[Any, Any]:
    """Tokenizer and model; ``config`` replaces the folder's (RoPE scaling);
    ``quant`` loads it quantised (``hf_quant``, which raises first if it cannot)."""
    extra = {} if config is None else {"config": config}
    extra.update(hf_quant.load_options(folder, quant, device, dtype))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, device_map=str(device), local_files_only=True, **extra
        )
    # Loaders raise many exception types on folders they cannot read (OSError for
    # missing files, ValueError for unknown architectures, KeyError...).
    except Exception as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise ModelLoadError(f"{folder}: cannot load: {lines[0]}") from exc
    model.eval()
    return model, tokenizer


def _trained_context(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return _FALLBACK_CTX


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends a turn: the tokenizer's EOS and generation_config's list."""
    found: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(v for v in value if isinstance(v, int))
    return frozenset(found)


def _adds_bos(tokenizer: Any, bos_id: int) -> bool:
    """Whether the tokenizer's own post-processing starts a text with BOS."""
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == bos_id


def _cache_kwarg(model: Any) -> str:
    """transformers 5.2x calls the KV cache argument ``cache``; earlier
    versions ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"

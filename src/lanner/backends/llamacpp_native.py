"""Thin, typed wrappers over llama.cpp's C API (through llama-cpp-python's ctypes).

Everything that touches a raw llama.cpp pointer outside the scheduler lives here:
quiet logging, loading a GGUF with errors Lanner can show, creating the context,
reading metadata, and the vocabulary (tokenize, detokenize, token pieces).
"""

from __future__ import annotations

import ctypes
import queue
import re
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from lanner.backends.rope import RopeScaling, set_llama_params
from lanner.errors import ModelLoadError, ModelNotFound

_GGML_LOG_LEVEL_ERROR = 4
_GGML_LOG_LEVEL_CONT = 5
_errors: deque[str] = deque(maxlen=8)
_last_level = 0
_init_lock = threading.Lock()
_initialised = False


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Print nothing; keep the last error lines so a failed load can say why."""
    global _last_level
    if level != _GGML_LOG_LEVEL_CONT:
        _last_level = level
    if _last_level == _GGML_LOG_LEVEL_ERROR:
        _errors.append(text.decode("utf-8", errors="replace").strip())


def _c_no_op() -> Any:
    """A log callback in C that does nothing, or None where there is none.

    Every call to ``_log_callback`` takes the GIL: a load reports about 1,200
    lines (smollm2), and a background load slowed by 20-80% while the
    caller's thread ran Python. libc's ``abs`` reads only its first argument
    (the level) and its result is dropped, which the C calling conventions
    of x86-64 and arm64 allow, so llama.cpp can call it without Python.
    Lines logged elsewhere in the process meanwhile (a decode) are dropped,
    as ``_log_callback`` drops all but a failed load's errors.
    """
    try:
        return ctypes.cast(ctypes.CDLL(None).abs, llama_cpp.llama_log_callback)
    except (OSError, AttributeError, TypeError):  # no process-wide libc symbols (Windows)
        return None


_no_op_callback = _c_no_op()


def init_llama() -> None:
    """Once per process: silence llama.cpp's stderr chatter and init its backends.

    The log callback is process-wide; llama-cpp-python's own ``Llama`` objects
    created later in the same process are quiet too.
    """
    global _initialised
    with _init_lock:
        if _initialised:
            return
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _initialised = True


def _load_failure(path: Path) -> ModelLoadError:
    generic = ("failed to load model", "error loading model: llama_model_loader")
    reasons = [line for line in _errors if line and not any(g in line for g in generic)]
    reason = reasons[0] if reasons else "llama.cpp could not read it"
    # "gguf_init_from_reader: invalid magic ..." -> "invalid magic ..."
    reason = re.sub(r"^(\w+: )+", "", reason).removeprefix("error loading model: ")
    return ModelLoadError(f"cannot load {path}: {reason}")


LOAD_OPTIONS: dict[str, int | bool] = {"n_gpu_layers": 0, "use_mmap": True}
"""The backend options that decide how weights load (and their defaults)."""


class _Preload(threading.Thread):
    """A load running on its own thread; ``result()`` waits for its model or error."""

    def __init__(self, path: Path, n_gpu_layers: int, use_mmap: bool) -> None:
        # Not a daemon: exiting waits for the load, never unloads llama.cpp under it.
        super().__init__(name=f"lanner-preload-{path.name}")
        self._args = (path, n_gpu_layers, use_mmap)
        self._model: Any = None
        self._error: Exception | None = None

    def run(self) -> None:
        path, n_gpu_layers, use_mmap = self._args
        try:
            self._model = _load(path, n_gpu_layers=n_gpu_layers, use_mmap=use_mmap,
                                quiet=True)
        except Exception as e:  # raised again in the thread that claims the load
            self._error = e

    def result(self) -> Any:
        self.join()
        if self._error is not None:
            raise self._error
        return self._model


_preloads_lock = threading.Lock()
_preloads: dict[tuple[str, int, bool], _Preload] = {}


def preload(path: Path, options: dict[str, Any]) -> None:
    """Start loading ``path`` with the backend ``options`` on a background thread.

    The next ``load_model`` of the same file with the same load options takes
    that model (or raises its error) instead of loading again. llama.cpp reads
    and repacks the weights without holding the GIL, so the caller's own
    start-up work (imports, templates, opening its log) runs meanwhile. Options
    of the wrong type start nothing: the backend reports them. A preload nobody
    claims keeps its model until the process exits.
    """
    load = {key: options.get(key, default) for key, default in LOAD_OPTIONS.items()}
    if any(type(load[key]) is not type(default) for key, default in LOAD_OPTIONS.items()):
        return
    key = (str(path), int(load["n_gpu_layers"]), bool(load["use_mmap"]))
    with _preloads_lock:
        if key not in _preloads:
            _preloads[key] = thread = _Preload(path, *key[1:])
            thread.start()


def load_model(path: Path, *, n_gpu_layers: int = 0, use_mmap: bool = True) -> Any:
    """Open a GGUF file; ModelNotFound if it is missing, ModelLoadError if unreadable.

    llama.cpp validates the file and returns NULL on a corrupt or truncated one;
    the reason comes from its (captured) error log.
    """
    with _preloads_lock:
        pending = _preloads.pop((str(path), n_gpu_layers, use_mmap), None)
    if pending is not None:
        return pending.result()
    return _load(path, n_gpu_layers=n_gpu_layers, use_mmap=use_mmap)


def _load(path: Path, *, n_gpu_layers: int, use_mmap: bool, quiet: bool = False) -> Any:
    """``quiet``: llama.cpp logs to ``_no_op_callback`` during the load, so it
    never waits for the GIL; a failure is loaded again with the Python
    callback to learn why."""
    init_llama()
    if not path.exists():
        raise ModelNotFound(f"no such model file: {path}")
    if not path.is_file():
        raise ModelLoadError(f"cannot load {path}: not a file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot load {path}: {e.strerror}") from e
    if magic != b"GGUF":
        raise ModelLoadError(f"cannot load {path}: not a GGUF file (bad magic bytes)")
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.load_mode = (
        llama_cpp.LLAMA_LOAD_MODE_MMAP if use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
    )
    quiet = quiet and _no_op_callback is not None
    with _init_lock:
        _errors.clear()
        if quiet:
            llama_cpp.llama_log_set(_no_op_callback, ctypes.c_void_p(0))
        try:
            model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), params)
        finally:
            if quiet:
                llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        if not model and not quiet:
            raise _load_failure(path)
    if not model:
        return _load(path, n_gpu_layers=n_gpu_layers, use_mmap=use_mmap)  # raises, with the reason
    return model


@dataclass(frozen=True, slots=True)
class ContextConfig:
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_seq_max: int
    n_threads: int
    flash_attn: bool
    split_kv: bool = False
    """Each sequence gets its own ``n_ctx`` cells (``n_seq_max * n_ctx`` in all)
    instead of all of them sharing ``n_ctx``."""
    rope: RopeScaling | None = None
    """RoPE scaling asked for (None: the model's own)."""


def create_context(model: Any, cfg: ContextConfig, path: Path) -> Any:
    """One llama_context serving up to ``n_seq_max`` sequences, each up to
    ``n_ctx`` positions long.

    Unified (the default): all sequences share ``n_ctx`` cells (llama-server's
    layout for parallel slots); every token's attention scans the cells of all
    of them, idle prefix caches included. Split: each sequence owns ``n_ctx``
    cells and attends over its own only, as fast as one sequence alone, for
    ``n_seq_max`` times the memory.
    """
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = cfg.n_ctx * cfg.n_seq_max if cfg.split_kv else cfg.n_ctx
    params.n_batch = cfg.n_batch
    params.n_ubatch = min(cfg.n_ubatch, cfg.n_batch)
    params.n_seq_max = cfg.n_seq_max
    params.n_threads = cfg.n_threads
    params.n_threads_batch = cfg.n_threads
    params.kv_unified = not cfg.split_kv
    if cfg.rope is not None:
        set_llama_params(params, cfg.rope)
    # Flash attention (the default, see LlamaCppBackend) skips other sequences'
    # masked cells instead of summing their zeros, so a sequence's numbers do not
    # depend on where its cells lie in a unified cache: batched == alone.
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if cfg.flash_attn
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    with _init_lock:
        _errors.clear()
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            reason = _errors[-1] if _errors else "llama.cpp could not create a context"
            raise ModelLoadError(f"cannot load {path}: {reason}")
    return ctx


def kv_cell_bytes(model: Any) -> int:
    """Bytes one KV cell takes (F16 keys and values in every layer): an
    estimate for planning memory, before any context exists."""
    n_head = max(1, int(llama_cpp.llama_model_n_head(model)))
    n_head_kv = int(llama_cpp.llama_model_n_head_kv(model)) or n_head
    arch = meta_str(model, "general.architecture") or ""
    fallback = int(llama_cpp.llama_model_n_embd(model)) // n_head

    def length(kind: str) -> int:
        value = meta_str(model, f"{arch}.attention.{kind}_length")
        return int(value) if value and value.isdigit() else fallback

    per_layer = n_head_kv * (length("key") + length("value")) * 2
    return int(llama_cpp.llama_model_n_layer(model)) * per_layer


class _Decoder:
    """One daemon thread that runs every ``llama_decode`` of the process."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Any, Any, list[int], threading.Lock]] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lanner-ggml", daemon=True)
        self._thread.start()

    def decode(self, ctx: Any, batch: Any) -> int:
        done = threading.Lock()
        done.acquire()
        result = [0]
        self._calls.put((ctx, batch, result, done))
        done.acquire()  # released by the decoding thread
        return result[0]

    def _run(self) -> None:
        while True:
            ctx, batch, result, done = self._calls.get()
            try:
                result[0] = int(llama_cpp.llama_decode(ctx, batch))
            except BaseException:  # pragma: no cover - ctypes raises nothing here
                result[0] = -1
            finally:
                done.release()


_decoder: _Decoder | None = None


def decode(ctx: Any, batch: Any) -> int:
    """``llama_decode`` on the process's one decoding thread.

    ggml runs its worker threads with OpenMP here, and OpenMP gives each thread
    that starts parallel work its own team. With two teams (two backends, each
    decoding on its own scheduler thread) there are more OpenMP threads than
    cores, libgomp stops spinning at barriers, and every context in the process
    decodes about 25% slower, even while the other one is idle. One thread for
    every context keeps one team (and two models never fight for the cores).
    """
    global _decoder
    if _decoder is None:
        with _init_lock:
            if _decoder is None:
                _decoder = _Decoder()
    return _decoder.decode(ctx, batch)


def meta_str(model: Any, key: str) -> str | None:
    """One GGUF metadata value as text (arrays are not exposed by llama.cpp)."""
    size = 1024
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_model_meta_val_str(model, key.encode("utf-8"), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", errors="replace")
        size = n + 1


class Vocab:
    """Tokenizer of a loaded model, with llama.cpp's exact semantics."""

    def __init__(self, model: Any) -> None:
        self.ptr = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self.ptr)
        self.bos: int = llama_cpp.llama_vocab_bos(self.ptr)
        self.eos: int = llama_cpp.llama_vocab_eos(self.ptr)
        self._pieces: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def text_of(self, token: int) -> str | None:
        """The vocabulary entry of a token id (e.g. ``<|im_end|>``); None for -1."""
        if token < 0:
            return None
        raw: bytes = llama_cpp.llama_vocab_get_text(self.ptr, token)
        return raw.decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.ptr, token))

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        """llama_tokenize: ``add_bos`` adds BOS (and EOS) only where the model
        asks for them; ``special`` parses special-token text into ids."""
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            buf = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self.ptr, data, len(data), buf, size, add_bos, special)
            if n >= 0:
                return list(buf[:n])
            size = -n

    def detokenize(self, ids: Sequence[int]) -> str:
        """llama_detokenize, keeping BOS/EOS and rendering special tokens as nothing."""
        arr = (llama_cpp.llama_token * len(ids))(*ids)
        size = 8 * len(ids) + 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_detokenize(self.ptr, arr, len(ids), buf, size, False, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n

    def piece(self, token: int) -> bytes:
        """The bytes one token adds to generated text (special tokens: none)."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self.ptr, token, buf, size, 0, False)
            if n >= 0:
                break
            size = -n
        with self._lock:
            self._pieces[token] = buf.raw[:n]
        return buf.raw[:n]

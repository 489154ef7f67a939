"""Text embeddings for ``/v1/embeddings``: the bundled all-MiniLM-L6-v2 on the
runtime ``lanner.rag.embed`` chooses (ONNX Runtime, int8 on a CPU with VNNI;
``runtime="torch"`` or ``$LANNER_EMBED_RUNTIME`` for sentence-transformers),
loaded on first use.

Vectors are unit length, as OpenAI's are, so a dot product is the cosine. An
input longer than the model's window (256 word pieces) is an error naming it,
never silently truncated; usage counts exactly the tokens the model reads
([CLS] and [SEP] included).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

from lanner.errors import InvalidRequest
from lanner.rag.embed import bundled_model_dir

MODEL_ID = "all-MiniLM-L6-v2"


class Embedder(Protocol):
    """What the server needs from an embedding model."""

    name: str
    """The id clients send as ``model`` (listed by /v1/models)."""
    dimensions: int

    def accepts(self, model: str) -> bool:
        """Whether ``model`` names this embedder."""
        ...

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Unit vectors for ``texts`` and the exact number of tokens read.
        Blocking; safe to call from several threads."""
        ...


class SentenceTransformerEmbedder:
    """A sentence-transformers folder, loaded lazily (once, under a lock)."""

    dimensions = 384

    def __init__(self, folder: Path | None = None, name: str = MODEL_ID,
                 runtime: str | None = None, home: Path | None = None) -> None:
        from lanner.rag.embed import choose_runtime

        self.folder = folder
        self.name = name
        self.runtime = choose_runtime(runtime)
        self.home = home  # its ONNX exports' cache (default: paths.home())
        self._model: Any = None
        self._lock = threading.Lock()
        # One batch at a time: torch already uses every core, and a fast
        # tokenizer shared between threads can fail with "Already borrowed".
        self._run_lock = threading.Lock()

    def accepts(self, model: str) -> bool:
        """The id, with or without the Hugging Face owner, in any case."""
        short = model.rsplit("/", 1)[-1].lower()
        return short == self.name.lower() or model == self.name

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                from lanner.rag.embed import sentence_model

                folder = self.folder or bundled_model_dir()
                self._model = sentence_model(folder, self.runtime, home=self.home)
                size = getattr(self._model, "get_embedding_dimension", None) or \
                    self._model.get_sentence_embedding_dimension
                self.dimensions = int(size() or 0)
            return self._model

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        model = self._load()
        with self._run_lock:
            return self._embed(model, texts)

    def _embed(self, model: Any, texts: list[str]) -> tuple[list[list[float]], int]:
        limit = int(model.max_seq_length)
        lengths = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]
        for i, n in enumerate(lengths):
            if n > limit:
                raise InvalidRequest(
                    "input", f"input[{i}] is {n} tokens, more than the embedding model's "
                    f"limit of {limit} tokens; split it into shorter pieces")
        vectors = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
        return vectors.tolist(), sum(lengths)

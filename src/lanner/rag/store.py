"""What a document store is: the records it keeps and the interface that the
embedded SQLite store and the PostgreSQL + pgvector store both implement.

A collection is a named set of documents embedded by one embedder (its
``spec`` and ``dimensions`` are fixed at creation). A document is one file,
known by its resolved path and the sha256 of its bytes. Its chunks carry
page, character span, heading path, text and a unit-length vector.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lanner.errors import InvalidRequest
from lanner.rag.chunking import Chunk

DEFAULT_COLLECTION = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str) -> str:
    """A collection name: letters, digits, '_', '.', '-' (1-64, not starting
    with punctuation). Raises ``InvalidRequest`` naming ``collection``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequest("collection", f"{name!r} is not a valid collection name "
                             "(letters, digits, '_', '.', '-'; at most 64)")
    return name


def no_such_collection(name: str, known: Sequence[str]) -> InvalidRequest:
    listed = ", ".join(known) if known else "none yet; create one with `lanner ingest`"
    return InvalidRequest("collection", f"no collection named {name!r} (known: {listed})")


@dataclass(frozen=True, slots=True)
class Collection:
    name: str
    embedder: str
    """The embedder spec (see ``lanner.rag.embed.open_embedder``)."""
    dimensions: int
    created_at: str
    documents: int = 0
    chunks: int = 0


@dataclass(frozen=True, slots=True)
class DocumentRecord:
    path: str
    """Absolute, resolved path of the file when it was ingested."""
    sha256: str
    pages: int
    chunks: int = 0
    ingested_at: str = ""

    @property
    def exists(self) -> bool:
        return Path(self.path).is_file()


@dataclass(frozen=True, slots=True)
class StoredChunk:
    id: int
    path: str
    page: int | None
    start: int
    end: int
    heading: str
    text: str


class DocumentStore(Protocol):
    """Both stores implement this; every method raises ``InvalidRequest``
    naming ``collection`` when the collection does not exist (except
    ``create_collection``, ``get_collection`` and ``collections``)."""

    location: str
    """Where the store lives (a file path or a database URL), for messages."""

    def create_collection(self, name: str, embedder: str, dimensions: int) -> Collection:
        """Create ``name``, or return it if it exists with the same embedder;
        a different embedder is an ``InvalidRequest``."""
        ...

    def get_collection(self, name: str) -> Collection | None: ...

    def collections(self) -> list[Collection]:
        """All collections with their document and chunk counts, by name."""
        ...

    def drop_collection(self, name: str) -> None: ...

    def documents(self, name: str) -> list[DocumentRecord]:
        """The collection's documents, by path."""
        ...

    def document_sha256(self, name: str, path: str) -> str | None:
        """The stored sha256 of ``path`` in the collection, or None."""
        ...

    def put_document(self, name: str, document: DocumentRecord, chunks: Sequence[Chunk],
                     vectors: np.ndarray) -> None:
        """Store a document and its chunks (one vector per chunk), replacing
        any earlier version of the same path, in one transaction."""
        ...

    def remove_document(self, name: str, path: str) -> bool:
        """Delete a document and its chunks; False if it was not there."""
        ...

    def vector_search(self, name: str, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(chunk id, cosine similarity) of the ``k`` nearest chunks, best first."""
        ...

    def keyword_search(self, name: str, terms: Sequence[str], k: int) -> list[tuple[int, float]]:
        """(chunk id, relevance) of the ``k`` best chunks matching any of
        ``terms`` (plain words), best first."""
        ...

    def get_chunks(self, ids: Sequence[int]) -> list[StoredChunk]:
        """The chunks with these ids, in the order asked (missing ids skipped)."""
        ...

    def close(self) -> None: ...


def check_vectors(chunks: Sequence[Chunk], vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 (len(chunks), dimensions) array."""
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    if array.shape != (len(chunks), dimensions):
        raise InvalidRequest("vectors", f"expected shape ({len(chunks)}, {dimensions}), "
                             f"got {array.shape}")
    return array


def open_store(location: str | Path | None = None, *, home: str | Path | None = None,
               ) -> DocumentStore:
    """The store at ``location``: a ``postgresql://`` URL opens PostgreSQL +
    pgvector; a file path opens that SQLite file; None opens the Lanner
    log database (``logs.db`` in the Lanner home)."""
    if isinstance(location, str) and location.startswith(("postgresql://", "postgres://")):
        from lanner.rag.store_pg import PgDocumentStore

        return PgDocumentStore(location)
    from lanner import paths
    from lanner.rag.store_sqlite import SqliteDocumentStore

    path = Path(location) if location else paths.db_path(paths.home(home))
    return SqliteDocumentStore(path)

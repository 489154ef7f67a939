"""Ingesting files into a collection: find, read, chunk, embed, store.

Idempotent by content: a file whose sha256 matches the stored one is not
read again; a changed file replaces all of its old chunks (one transaction
per file, so a search never sees half a file). A file that cannot be read
is reported in ``IngestReport.skipped`` and the run goes on.

Chunks of several files are embedded together in batches (small files alone
would make tiny, slow batches); each file is written once its vectors exist.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lanner.rag.chunking import MAX_CHARS, OVERLAP, Chunk, chunk_pages
from lanner.rag.embed import Embedder
from lanner.rag.loaders import UnreadableDocument, discover, load
from lanner.rag.store import DocumentRecord, DocumentStore
from lanner.store.hashing import sha256_of_file


@dataclass(slots=True)
class IngestReport:
    collection: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) for each file that was not ingested."""
    chunks: int = 0
    """Chunks written by this run."""
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Progress:
    """Passed to the progress callback after each file."""

    done: int
    total: int
    path: str
    chunks: int


@dataclass(slots=True)
class _Pending:
    record: DocumentRecord
    chunks: list[Chunk]
    new: bool


def embedding_text(chunk: Chunk) -> str:
    """What gets embedded: the heading path gives a passage its topic."""
    return f"{chunk.heading}\n{chunk.text}" if chunk.heading else chunk.text


def ingest(store: DocumentStore, embedder: Embedder, collection: str,
           paths: Iterable[str | Path], *, max_chars: int = MAX_CHARS, overlap: int = OVERLAP,
           batch_chunks: int = 256, progress: Callable[[Progress], None] | None = None,
           ) -> IngestReport:
    """Add ``paths`` (files or folders) to ``collection``, creating it with
    ``embedder`` if needed. Returns what happened to each file."""
    started = time.perf_counter()
    existing = store.get_collection(collection)
    if existing is None or existing.embedder != embedder.spec:
        # Raises for a different embedder; a new collection needs the model's
        # dimensions, so only then is the model loaded before any text changed.
        dimensions = existing.dimensions if existing else embedder.dimensions
        store.create_collection(collection, embedder.spec, dimensions)
    files, rejected = discover(Path(p) for p in paths)
    report = IngestReport(collection, skipped=[(str(p), why) for p, why in rejected])
    pending: list[_Pending] = []
    for done, path in enumerate(files, 1):
        item = _prepare(store, collection, path, report, max_chars, overlap)
        if item is not None:
            pending.append(item)
        if sum(len(p.chunks) for p in pending) >= batch_chunks:
            _flush(store, embedder, collection, pending, report)
        if progress:
            progress(Progress(done, len(files), str(path), report.chunks))
    _flush(store, embedder, collection, pending, report)
    report.seconds = time.perf_counter() - started
    return report


def _prepare(store: DocumentStore, collection: str, path: Path, report: IngestReport,
             max_chars: int, overlap: int) -> _Pending | None:
    """Read and chunk ``path`` unless it is unchanged or unreadable."""
    key = str(path)
    try:
        sha = sha256_of_file(path)
    except OSError as exc:
        report.skipped.append((key, f"cannot read: {exc.strerror or exc}"))
        return None
    known = store.document_sha256(collection, key)
    if known == sha:
        report.unchanged.append(key)
        return None
    try:
        pages = load(path)
    except UnreadableDocument as exc:
        report.skipped.append((key, str(exc).removeprefix(f"{path}: ")))
        return None
    chunks = chunk_pages(pages, max_chars=max_chars, overlap=overlap)
    if not chunks:
        report.skipped.append((key, "no text found (a scanned PDF needs OCR first)"))
        return None
    return _Pending(DocumentRecord(key, sha, len(pages)), chunks, known is None)


def _flush(store: DocumentStore, embedder: Embedder, collection: str,
           pending: list[_Pending], report: IngestReport) -> None:
    """Embed every pending chunk in one call, then write file by file."""
    if not pending:
        return
    vectors = embedder.embed([embedding_text(c) for p in pending for c in p.chunks])
    offset = 0
    for item in pending:
        n = len(item.chunks)
        store.put_document(collection, item.record, item.chunks, vectors[offset:offset + n])
        offset += n
        report.chunks += n
        (report.added if item.new else report.updated).append(item.record.path)
    pending.clear()

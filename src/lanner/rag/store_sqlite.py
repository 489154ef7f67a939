"""The embedded document store: tables in Lanner's own SQLite database.

Text and metadata are rows (schema: ``store/migrations/0002_documents.sql``),
keyword search is FTS5 with BM25, and vector search is exact: the
collection's vectors are read once into a numpy matrix and searched with one
matrix-vector product (a few milliseconds for 100k x 384; see
``benchmarks/rag_speed.py``). The matrix is cached per collection and
reloaded when the collection's ``version`` changes, so writes from another
process are seen by the next search.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lanner.errors import InvalidRequest, StoreError
from lanner.rag.chunking import Chunk
from lanner.rag.store import (
    Collection,
    DocumentRecord,
    StoredChunk,
    check_name,
    check_vectors,
    no_such_collection,
)
from lanner.store import Store, utc_now
from lanner.store.transactions import Transactions

_F32 = np.dtype("<f4")


@dataclass(slots=True)
class _Matrix:
    version: int
    ids: np.ndarray
    """(n,) int64 chunk ids, row order of ``vectors``."""
    vectors: np.ndarray
    """(n, d) float32, unit rows."""


class SqliteDocumentStore(Transactions):
    """Document collections inside the SQLite file at ``path`` (normally
    ``logs.db``). The file is created and migrated by ``lanner.store.Store``;
    this class keeps its own connection. Thread-safe (one lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        Store(self.path).close()  # creates the file and applies pending migrations
        try:
            self._conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable enough for an index
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        self._lock = threading.RLock()
        self._matrices: dict[str, _Matrix] = {}

    def _collection_id(self, conn: sqlite3.Connection, name: str) -> int:
        row = conn.execute("SELECT id FROM collections WHERE name = ?", (name,)).fetchone()
        if row is None:
            names = [r[0] for r in conn.execute("SELECT name FROM collections ORDER BY name")]
            raise no_such_collection(name, names)
        return int(row[0])

    # -- collections ------------------------------------------------------------

    def create_collection(self, name: str, embedder: str, dimensions: int) -> Collection:
        check_name(name)
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO collections (name, embedder, dimensions, created_at)"
                " VALUES (?, ?, ?, ?)", (name, embedder, dimensions, utc_now()))
        found = self.get_collection(name)
        if found is None:  # cannot happen after the insert; keeps the type exact
            raise StoreError(f"collection {name!r} vanished while being created")
        if (found.embedder, found.dimensions) != (embedder, dimensions):
            raise InvalidRequest("embedder", f"collection {name!r} was built with embedder "
                                 f"{found.embedder!r} ({found.dimensions} dimensions), not "
                                 f"{embedder!r}; use that one or another collection")
        return found

    def get_collection(self, name: str) -> Collection | None:
        return next((c for c in self.collections() if c.name == name), None)

    def collections(self) -> list[Collection]:
        sql = """
            SELECT c.name, c.embedder, c.dimensions, c.created_at,
                   (SELECT count(*) FROM documents d WHERE d.collection_id = c.id),
                   (SELECT count(*) FROM chunks k WHERE k.collection_id = c.id)
            FROM collections c ORDER BY c.name"""
        with self._read() as conn:
            return [Collection(*row) for row in conn.execute(sql)]

    def drop_collection(self, name: str) -> None:
        with self._write() as conn:
            cid = self._collection_id(conn, name)
            conn.execute("DELETE FROM chunks WHERE collection_id = ?", (cid,))
            conn.execute("DELETE FROM collections WHERE id = ?", (cid,))
        self._matrices.pop(name, None)

    # -- documents ----------------------------------------------------------------

    def documents(self, name: str) -> list[DocumentRecord]:
        sql = """
            SELECT d.path, d.sha256, d.pages,
                   (SELECT count(*) FROM chunks k WHERE k.document_id = d.id), d.ingested_at
            FROM documents d WHERE d.collection_id = ? ORDER BY d.path"""
        with self._read() as conn:
            cid = self._collection_id(conn, name)
            return [DocumentRecord(*row) for row in conn.execute(sql, (cid,))]

    def document_sha256(self, name: str, path: str) -> str | None:
        with self._read() as conn:
            cid = self._collection_id(conn, name)
            row = conn.execute("SELECT sha256 FROM documents WHERE collection_id = ? AND path = ?",
                               (cid, path)).fetchone()
        return None if row is None else str(row[0])

    def put_document(self, name: str, document: DocumentRecord, chunks: Sequence[Chunk],
                     vectors: np.ndarray) -> None:
        with self._write() as conn:
            cid = self._collection_id(conn, name)
            dims = conn.execute("SELECT dimensions FROM collections WHERE id = ?",
                                (cid,)).fetchone()[0]
            array = check_vectors(chunks, vectors, int(dims)).astype(_F32, copy=False)
            self._delete_document(conn, cid, document.path)
            cursor = conn.execute(
                "INSERT INTO documents (collection_id, path, sha256, pages, ingested_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (cid, document.path, document.sha256, document.pages, utc_now()))
            conn.executemany(
                "INSERT INTO chunks (document_id, collection_id, page, start_char, end_char,"
                " heading, text, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(cursor.lastrowid, cid, c.page, c.start, c.end, c.heading, c.text,
                  array[i].tobytes()) for i, c in enumerate(chunks)])
            conn.execute("UPDATE collections SET version = version + 1 WHERE id = ?", (cid,))

    def remove_document(self, name: str, path: str) -> bool:
        with self._write() as conn:
            cid = self._collection_id(conn, name)
            removed = self._delete_document(conn, cid, path)
            conn.execute("UPDATE collections SET version = version + 1 WHERE id = ?", (cid,))
        return removed

    @staticmethod
    def _delete_document(conn: sqlite3.Connection, cid: int, path: str) -> bool:
        row = conn.execute("SELECT id FROM documents WHERE collection_id = ? AND path = ?",
                           (cid, path)).fetchone()
        if row is None:
            return False
        # Chunks first, explicitly: their delete trigger keeps the FTS index in step.
        conn.execute("DELETE FROM chunks WHERE document_id = ?", (row[0],))
        conn.execute("DELETE FROM documents WHERE id = ?", (row[0],))
        return True

    # -- search ---------------------------------------------------------------------

    def vector_search(self, name: str, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        matrix = self._matrix(name)
        if k < 1 or not len(matrix.ids):
            return []
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        if query.shape[0] != matrix.vectors.shape[1]:
            raise InvalidRequest("vector", f"has {query.shape[0]} dimensions; collection "
                                 f"{name!r} has {matrix.vectors.shape[1]}")
        # einsum, not @: numpy's BLAS splits a matrix-vector product over
        # threads, and on a busy machine waiting for the second thread costs
        # ~12 ms at any size; einsum's single loop is memory-bound (0.3 ms at
        # 10k, 9 ms at 100k x 384).
        scores = np.einsum("ij,j->i", matrix.vectors, query)  # (n,)
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(matrix.ids[i]), float(scores[i])) for i in top]

    def _matrix(self, name: str) -> _Matrix:
        with self._read() as conn:
            row = conn.execute("SELECT id, version, dimensions FROM collections WHERE name = ?",
                               (name,)).fetchone()
            if row is None:
                self._collection_id(conn, name)  # raises, listing the known names
            cid, version, dims = int(row[0]), int(row[1]), int(row[2])
            cached = self._matrices.get(name)
            if cached is not None and cached.version == version:
                return cached
            rows = conn.execute("SELECT id, embedding FROM chunks WHERE collection_id = ?"
                                " ORDER BY id", (cid,)).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=_F32)
        matrix = _Matrix(version, ids, vectors.reshape(len(rows), dims).astype(np.float32))
        self._matrices[name] = matrix
        return matrix

    def keyword_search(self, name: str, terms: Sequence[str], k: int) -> list[tuple[int, float]]:
        # Each term is quoted, so FTS5 query syntax in user text is inert.
        words = " OR ".join('"' + t.replace('"', "") + '"' for t in terms if t.strip('"'))
        if not words or k < 1:
            return []
        with self._read() as conn:
            cid = self._collection_id(conn, name)
            rows = conn.execute(
                "SELECT rowid, bm25(chunks_fts, 1.0, 0.5, 0.0) AS score FROM chunks_fts"
                " WHERE chunks_fts MATCH ? ORDER BY score LIMIT ?",
                (f"({words}) AND collection : c{cid}", k)).fetchall()
        # bm25() is "lower is better" (negative); report higher-is-better.
        return [(int(r[0]), -float(r[1])) for r in rows]

    def get_chunks(self, ids: Sequence[int]) -> list[StoredChunk]:
        if not ids:
            return []
        marks = ", ".join("?" * len(ids))
        sql = f"""
            SELECT c.id, d.path, c.page, c.start_char, c.end_char, c.heading, c.text
            FROM chunks c JOIN documents d ON d.id = c.document_id WHERE c.id IN ({marks})"""
        with self._read() as conn:
            found = {row[0]: StoredChunk(*row) for row in conn.execute(sql, list(ids))}
        return [found[i] for i in ids if i in found]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self._matrices.clear()

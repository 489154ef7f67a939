"""The document store for collections that outgrow one machine: PostgreSQL
with the pgvector extension (``postgresql://`` URLs).

Same interface as the SQLite store. Vectors live in a ``vector`` column and
each collection gets its own partial HNSW index on ``embedding::vector(d)``
(a collection fixes its dimensions; the table holds any). Keyword search uses
PostgreSQL full text search (``tsvector`` + GIN, ranked by ``ts_rank_cd``).
The schema is created on first open (tables prefixed ``lanner_``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from lanner.errors import BackendUnavailable, InvalidRequest, StoreError
from lanner.rag.chunking import Chunk
from lanner.rag.store import (
    Collection,
    DocumentRecord,
    StoredChunk,
    check_name,
    check_vectors,
    no_such_collection,
)

EF_SEARCH = 100
"""HNSW candidate list size at query time (pgvector's default is 40): recall
against exact search >= 0.95 at k=10 in benchmarks/rag_speed.py."""

_SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS lanner_collections (
    id          serial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    embedder    text NOT NULL,
    dimensions  integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS lanner_documents (
    id             serial PRIMARY KEY,
    collection_id  integer NOT NULL REFERENCES lanner_collections(id) ON DELETE CASCADE,
    path           text NOT NULL,
    sha256         text NOT NULL,
    pages          integer NOT NULL,
    ingested_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (collection_id, path)
);
CREATE TABLE IF NOT EXISTS lanner_chunks (
    id             bigserial PRIMARY KEY,
    document_id    integer NOT NULL REFERENCES lanner_documents(id) ON DELETE CASCADE,
    collection_id  integer NOT NULL,
    page           integer,
    start_char     integer NOT NULL,
    end_char       integer NOT NULL,
    heading        text NOT NULL,
    text           text NOT NULL,
    embedding      vector NOT NULL,
    tsv            tsvector GENERATED ALWAYS AS
                   (to_tsvector('english', heading || ' ' || text)) STORED
);
CREATE INDEX IF NOT EXISTS lanner_chunks_document ON lanner_chunks (document_id);
CREATE INDEX IF NOT EXISTS lanner_chunks_tsv ON lanner_chunks USING gin (tsv);
"""


def _connect(url: str) -> Any:
    try:
        import psycopg
        from pgvector.psycopg import register_vector
    except ImportError as exc:
        raise BackendUnavailable("the PostgreSQL store needs psycopg and pgvector "
                                 "(pip install 'psycopg[binary]' pgvector)") from exc
    try:
        conn = psycopg.connect(url, autocommit=True)
        conn.execute(_SCHEMA)
        register_vector(conn)
        conn.execute(f"SET hnsw.ef_search = {EF_SEARCH}")
    except psycopg.Error as exc:
        raise StoreError(f"cannot open the PostgreSQL store {_redact(url)}: {exc}") from exc
    return conn


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.rpartition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, user = head.partition("//")
    return f"{scheme}//{user.split(':', 1)[0]}:***@{tail}"


class PgDocumentStore:
    """Collections in the PostgreSQL database at ``url`` (pgvector >= 0.5)."""

    def __init__(self, url: str) -> None:
        self.location = _redact(url)
        self._conn = _connect(url)

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        import psycopg

        try:
            with self._conn.transaction():
                yield self._conn
        except psycopg.Error as exc:
            raise StoreError(f"{self.location}: {exc}") from exc

    def _collection(self, conn: Any, name: str) -> tuple[int, int]:
        row = conn.execute("SELECT id, dimensions FROM lanner_collections WHERE name = %s",
                           (name,)).fetchone()
        if row is None:
            names = [r[0] for r in conn.execute(
                "SELECT name FROM lanner_collections ORDER BY name")]
            raise no_such_collection(name, names)
        return int(row[0]), int(row[1])

    # -- collections ------------------------------------------------------------

    def create_collection(self, name: str, embedder: str, dimensions: int) -> Collection:
        check_name(name)
        with self._tx() as conn:
            row = conn.execute(
                "INSERT INTO lanner_collections (name, embedder, dimensions) VALUES (%s, %s, %s)"
                " ON CONFLICT (name) DO NOTHING RETURNING id", (name, embedder, dimensions),
            ).fetchone()
            if row is not None:
                # One partial index per collection: its own dimensions, its rows only.
                conn.execute(
                    f"CREATE INDEX lanner_chunks_hnsw_{row[0]} ON lanner_chunks USING hnsw"
                    f" ((embedding::vector({int(dimensions)})) vector_ip_ops)"
                    f" WHERE collection_id = {int(row[0])}")
        found = self.get_collection(name)
        if found is None or (found.embedder, found.dimensions) != (embedder, dimensions):
            have = f"{found.embedder!r} ({found.dimensions} dimensions)" if found else "?"
            raise InvalidRequest("embedder", f"collection {name!r} was built with embedder "
                                 f"{have}, not {embedder!r}; use that one or another collection")
        return found

    def get_collection(self, name: str) -> Collection | None:
        return next((c for c in self.collections() if c.name == name), None)

    def collections(self) -> list[Collection]:
        sql = """
            SELECT c.name, c.embedder, c.dimensions, c.created_at::text,
                   (SELECT count(*) FROM lanner_documents d WHERE d.collection_id = c.id),
                   (SELECT count(*) FROM lanner_chunks k WHERE k.collection_id = c.id)
            FROM lanner_collections c ORDER BY c.name"""
        with self._tx() as conn:
            return [Collection(*row) for row in conn.execute(sql)]

    def drop_collection(self, name: str) -> None:
        with self._tx() as conn:
            cid, _ = self._collection(conn, name)
            conn.execute("DELETE FROM lanner_chunks WHERE collection_id = %s", (cid,))
            conn.execute(f"DROP INDEX IF EXISTS lanner_chunks_hnsw_{cid}")
            conn.execute("DELETE FROM lanner_collections WHERE id = %s", (cid,))

    # -- documents ----------------------------------------------------------------

    def documents(self, name: str) -> list[DocumentRecord]:
        sql = """
            SELECT d.path, d.sha256, d.pages,
                   (SELECT count(*) FROM lanner_chunks k WHERE k.document_id = d.id),
                   d.ingested_at::text
            FROM lanner_documents d WHERE d.collection_id = %s ORDER BY d.path"""
        with self._tx() as conn:
            cid, _ = self._collection(conn, name)
            return [DocumentRecord(*row) for row in conn.execute(sql, (cid,))]

    def document_sha256(self, name: str, path: str) -> str | None:
        with self._tx() as conn:
            cid, _ = self._collection(conn, name)
            row = conn.execute("SELECT sha256 FROM lanner_documents"
                               " WHERE collection_id = %s AND path = %s", (cid, path)).fetchone()
        return None if row is None else str(row[0])

    def put_document(self, name: str, document: DocumentRecord, chunks: Sequence[Chunk],
                     vectors: np.ndarray) -> None:
        with self._tx() as conn:
            cid, dims = self._collection(conn, name)
            array = check_vectors(chunks, vectors, dims)
            conn.execute("DELETE FROM lanner_documents WHERE collection_id = %s AND path = %s",
                         (cid, document.path))
            doc_id = conn.execute(
                "INSERT INTO lanner_documents (collection_id, path, sha256, pages)"
                " VALUES (%s, %s, %s, %s) RETURNING id",
                (cid, document.path, document.sha256, document.pages)).fetchone()[0]
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO lanner_chunks (document_id, collection_id, page, start_char,"
                    " end_char, heading, text, embedding) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    [(doc_id, cid, c.page, c.start, c.end, c.heading, c.text, array[i])
                     for i, c in enumerate(chunks)])

    def remove_document(self, name: str, path: str) -> bool:
        with self._tx() as conn:
            cid, _ = self._collection(conn, name)
            row = conn.execute("DELETE FROM lanner_documents WHERE collection_id = %s"
                               " AND path = %s RETURNING id", (cid, path)).fetchone()
        return row is not None

    # -- search ---------------------------------------------------------------------

    def vector_search(self, name: str, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        with self._tx() as conn:
            cid, dims = self._collection(conn, name)
            if query.shape[0] != dims:
                raise InvalidRequest("vector", f"has {query.shape[0]} dimensions; collection "
                                     f"{name!r} has {dims}")
            if k < 1:
                return []
            # The expression must match the partial index's for the planner to use it.
            rows = conn.execute(
                f"SELECT id, (embedding::vector({dims})) <#> %s AS d FROM lanner_chunks"
                f" WHERE collection_id = %s ORDER BY (embedding::vector({dims})) <#> %s"
                f" LIMIT %s", (query, cid, query, k)).fetchall()
        # <#> is the negative inner product: the cosine, for unit vectors.
        return [(int(r[0]), -float(r[1])) for r in rows]

    def keyword_search(self, name: str, terms: Sequence[str], k: int) -> list[tuple[int, float]]:
        words = [t for t in terms if t.isalnum()]
        if not words or k < 1:
            return []
        # to_tsquery over "a | b | c": any word matches; plainto_tsquery would need all.
        query = " | ".join(words)
        sql = """
            SELECT id, ts_rank_cd(tsv, q) AS score
            FROM lanner_chunks, to_tsquery('english', %s) AS q
            WHERE collection_id = %s AND tsv @@ q ORDER BY score DESC, id LIMIT %s"""
        with self._tx() as conn:
            cid, _ = self._collection(conn, name)
            rows = conn.execute(sql, (query, cid, k)).fetchall()
        return [(int(r[0]), float(r[1])) for r in rows]

    def get_chunks(self, ids: Sequence[int]) -> list[StoredChunk]:
        if not ids:
            return []
        sql = """
            SELECT c.id, d.path, c.page, c.start_char, c.end_char, c.heading, c.text
            FROM lanner_chunks c JOIN lanner_documents d ON d.id = c.document_id
            WHERE c.id = ANY(%s)"""
        with self._tx() as conn:
            found = {row[0]: StoredChunk(*row) for row in conn.execute(sql, (list(ids),))}
        return [found[i] for i in ids if i in found]

    def close(self) -> None:
        self._conn.close()

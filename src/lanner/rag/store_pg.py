"""The document store for collections that outgrow one machine: PostgreSQL
with the pgvector extension (``postgresql://`` URLs).

Same interface as the SQLite store. Vectors live in a ``vector`` column and
each collection gets its own partial HNSW index on ``embedding::vector(d)``
(a collection fixes its dimensions; the table holds any). Keyword search is
BM25 over term statistics kept per collection, with the SQLite store's terms
(``store_pg_schema``, ``terms``). A file's chunks and postings go in with
COPY, in one transaction per file. One store holds a pool of connections,
shared by every thread that uses it (``lanner serve`` keeps one store).
The tables are created on first open (prefixed ``lanner_``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from lanner.errors import BackendUnavailable, InvalidRequest, StoreError
from lanner.rag import store_pg_schema as schema
from lanner.rag.chunking import Chunk
from lanner.rag.store import (
    Collection,
    DocumentRecord,
    StoredChunk,
    check_name,
    check_vectors,
    no_such_collection,
)
from lanner.rag.terms import chunk_terms, query_terms

EF_SEARCH = 100
"""HNSW candidate list size at query time (pgvector's default is 40): recall
against exact search >= 0.95 at k=10 in benchmarks/rag_speed.py."""
POOL_SIZE = 8
"""Most connections one store opens (threads beyond it wait for one)."""
POOL_TIMEOUT_S = 30.0


def _open_pool(url: str, location: str, size: int) -> Any:
    try:
        import psycopg
        from pgvector.psycopg import register_vector
        from psycopg_pool import ConnectionPool
    except ImportError as exc:
        raise BackendUnavailable("the PostgreSQL store needs psycopg, psycopg-pool and "
                                 "pgvector (pip install 'psycopg[binary,pool]' pgvector)"
                                 ) from exc

    def configure(conn: Any) -> None:
        register_vector(conn)
        conn.execute(f"SET hnsw.ef_search = {EF_SEARCH}")

    try:
        with psycopg.connect(url, autocommit=True) as conn:
            schema.create_or_upgrade(conn)
        pool = ConnectionPool(url, min_size=1, max_size=size, open=False, configure=configure,
                              kwargs={"autocommit": True, "application_name": "lanner"},
                              timeout=POOL_TIMEOUT_S, name="lanner")
        pool.open(wait=True, timeout=POOL_TIMEOUT_S)
    except psycopg.Error as exc:
        raise StoreError(f"cannot open the PostgreSQL store {location}: {exc}") from exc
    return pool


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.rpartition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, user = head.partition("//")
    return f"{scheme}//{user.split(':', 1)[0]}:***@{tail}"


class PgDocumentStore:
    """Collections in the PostgreSQL database at ``url`` (pgvector >= 0.5).
    Thread-safe: each call borrows a connection from the store's pool of at
    most ``pool_size``."""

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE) -> None:
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise InvalidRequest("pool_size", f"must be a positive integer, got {pool_size!r}")
        self.location = _redact(url)
        self._pool = _open_pool(url, self.location, pool_size)

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """One transaction on a pooled connection: committed on success."""
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            with self._pool.connection() as conn, conn.transaction():
                yield conn
        except PoolTimeout as exc:
            raise StoreError(f"{self.location}: no free connection after "
                             f"{POOL_TIMEOUT_S:.0f} s ({exc})") from exc
        except psycopg.Error as exc:
            raise StoreError(f"{self.location}: {exc}") from exc

    def _collection(self, conn: Any, name: str, *, lock: bool = False) -> tuple[int, int]:
        """(id, dimensions) of collection ``name``; ``lock``: hold its row lock
        to the end of the transaction (every write does: one writer at a time)."""
        row = conn.execute("SELECT id, dimensions FROM lanner_collections WHERE name = %s"
                           + (" FOR UPDATE" if lock else ""), (name,)).fetchone()
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
        # chunk_count is kept by every write (counting 100k chunks is a table scan,
        # and every search asks for its collection).
        sql = """
            SELECT c.name, c.embedder, c.dimensions, c.created_at::text,
                   (SELECT count(*) FROM lanner_documents d WHERE d.collection_id = c.id),
                   c.chunk_count
            FROM lanner_collections c ORDER BY c.name"""
        with self._tx() as conn:
            return [Collection(*row) for row in conn.execute(sql)]

    def drop_collection(self, name: str) -> None:
        with self._tx() as conn:
            cid, _ = self._collection(conn, name, lock=True)
            schema.drop_terms(conn, cid)
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
        terms = chunk_terms([(c.text, c.heading) for c in chunks])  # before taking the lock
        with self._tx() as conn:
            cid, dims = self._collection(conn, name, lock=True)
            array = check_vectors(chunks, vectors, dims)
            self._delete_document(conn, cid, document.path)
            doc_id = conn.execute(
                "INSERT INTO lanner_documents (collection_id, path, sha256, pages)"
                " VALUES (%s, %s, %s, %s) RETURNING id",
                (cid, document.path, document.sha256, document.pages)).fetchone()[0]
            ids = [r[0] for r in conn.execute(
                "SELECT nextval(pg_get_serial_sequence('lanner_chunks', 'id'))"
                " FROM generate_series(1, %s)", (len(chunks),))]
            term_ids = schema.add_terms(conn, cid, ids, terms)
            with conn.cursor() as cursor, cursor.copy(
                    "COPY lanner_chunks (id, document_id, collection_id, page, start_char,"
                    " end_char, heading, text, embedding, length, term_ids) FROM STDIN") as copy:
                for i, c in enumerate(chunks):
                    copy.write_row((ids[i], doc_id, cid, c.page, c.start, c.end, c.heading,
                                    c.text, array[i], terms[i].length, term_ids[i]))

    def remove_document(self, name: str, path: str) -> bool:
        with self._tx() as conn:
            cid, _ = self._collection(conn, name, lock=True)
            return self._delete_document(conn, cid, path)

    @staticmethod
    def _delete_document(conn: Any, cid: int, path: str) -> bool:
        row = conn.execute("SELECT id FROM lanner_documents WHERE collection_id = %s"
                           " AND path = %s", (cid, path)).fetchone()
        if row is None:
            return False
        schema.remove_terms(conn, cid, row[0])
        conn.execute("DELETE FROM lanner_documents WHERE id = %s", (row[0],))  # chunks cascade
        return True

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
        counts: Counter[str] = query_terms([t for t in terms if t.strip()])
        if not counts or k < 1:
            return []
        with self._tx() as conn:
            cid, _ = self._collection(conn, name)
            rows = conn.execute(schema.BM25_SQL, {"cid": cid, "terms": list(counts),
                                                  "counts": list(counts.values()), "k": k})
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
        self._pool.close()

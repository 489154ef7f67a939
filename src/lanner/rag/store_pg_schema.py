"""The PostgreSQL store's tables, their upgrades, and its keyword index.

Keyword search is BM25 computed in SQL from term statistics kept per
collection, scored as SQLite's FTS5 scores it (k1 = 1.2, b = 0.75, idf =
ln((N - df + 0.5) / (df + 0.5)), at least 1e-6), over the same terms
(``lanner.rag.terms``). No extension is needed, so it runs on any PostgreSQL
with pgvector (managed services included). Extensions that do BM25
(ParadeDB's ``pg_search``, VectorChord-bm25) would each tokenize differently
from the SQLite store and are absent from most hosted PostgreSQL.

- ``lanner_terms``: per collection, each term and ``df``, the number of the
  collection's chunks containing it;
- ``lanner_postings``: (term, chunk, tf, chunk length), one row per term of a
  chunk; the primary key covers tf and length, so a query reads the index only;
- ``lanner_collections.chunk_count`` / ``token_count``: N and the total
  length (for the average length);
- ``lanner_chunks.term_ids``: the chunk's terms, so its postings can be
  deleted through the primary key.

Every write to a collection takes its ``lanner_collections`` row lock first,
so concurrent writers (several processes ingesting) queue per collection and
the statistics stay exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lanner.rag.terms import ChunkTerms, chunk_terms

VERSION = 2
"""1: tsvector ranked by ts_rank_cd (before 2026-12); 2: BM25 term statistics."""

K1 = 1.2
B = 0.75

_LOCK_KEY = 7_240_116
"""pg_advisory_xact_lock key: processes opening a new database create the schema one at a time."""

_TABLES = """
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
    embedding      vector NOT NULL
);
CREATE INDEX IF NOT EXISTS lanner_chunks_document ON lanner_chunks (document_id);
"""

_VERSION_2 = """
ALTER TABLE lanner_collections ADD COLUMN IF NOT EXISTS chunk_count bigint NOT NULL DEFAULT 0;
ALTER TABLE lanner_collections ADD COLUMN IF NOT EXISTS token_count bigint NOT NULL DEFAULT 0;
ALTER TABLE lanner_chunks DROP COLUMN IF EXISTS tsv;
ALTER TABLE lanner_chunks ADD COLUMN IF NOT EXISTS length integer NOT NULL DEFAULT 0;
ALTER TABLE lanner_chunks ADD COLUMN IF NOT EXISTS term_ids integer[] NOT NULL DEFAULT '{}';
CREATE TABLE IF NOT EXISTS lanner_terms (
    id             serial PRIMARY KEY,
    collection_id  integer NOT NULL REFERENCES lanner_collections(id) ON DELETE CASCADE,
    term           text NOT NULL,
    df             integer NOT NULL,
    UNIQUE (collection_id, term)
);
CREATE TABLE IF NOT EXISTS lanner_postings (
    term_id   integer NOT NULL,
    chunk_id  bigint NOT NULL,
    tf        real NOT NULL,
    length    integer NOT NULL,
    PRIMARY KEY (term_id, chunk_id) INCLUDE (tf, length)
);
"""


def create_or_upgrade(conn: Any) -> None:
    """Create the tables, or bring a database made by an older Lanner up to
    ``VERSION`` (re-indexing its chunks' terms). Safe with several processes."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        old = conn.execute("SELECT to_regclass('lanner_chunks') IS NOT NULL").fetchone()[0]
        conn.execute("CREATE TABLE IF NOT EXISTS lanner_schema (version integer NOT NULL)")
        row = conn.execute("SELECT max(version) FROM lanner_schema").fetchone()
        version = row[0] or (1 if old else 0)
        if version >= VERSION:
            return
        conn.execute(_TABLES)
        conn.execute(_VERSION_2)
        if version == 1:
            _reindex_all(conn)
        conn.execute("DELETE FROM lanner_schema")
        conn.execute("INSERT INTO lanner_schema (version) VALUES (%s)", (VERSION,))


def _reindex_all(conn: Any) -> None:
    """Term statistics for chunks stored by schema version 1."""
    collections = [r[0] for r in conn.execute("SELECT id FROM lanner_collections")]
    for cid in collections:
        last = 0
        while batch := conn.execute(
                "SELECT id, text, heading FROM lanner_chunks WHERE collection_id = %s"
                " AND id > %s ORDER BY id LIMIT 1000", (cid, last)).fetchall():
            last = batch[-1][0]
            terms = chunk_terms([(text, heading) for _, text, heading in batch])
            ids = [r[0] for r in batch]
            term_ids = add_terms(conn, cid, ids, terms)
            with conn.cursor() as cursor:
                cursor.executemany(
                    "UPDATE lanner_chunks SET length = %s, term_ids = %s WHERE id = %s",
                    [(t.length, tids, i) for t, tids, i in zip(terms, term_ids, ids,
                                                               strict=True)])


# -- writing the keyword index -------------------------------------------------------


def add_terms(conn: Any, cid: int, chunk_ids: Sequence[int],
              terms: Sequence[ChunkTerms]) -> list[list[int]]:
    """Index chunks of collection ``cid`` (their rows may be written after):
    postings, document frequencies, N and total length. Returns each chunk's
    term ids. The caller holds the collection's row lock."""
    df: dict[str, int] = {}
    for chunk in terms:
        for term in chunk.tf:
            df[term] = df.get(term, 0) + 1
    ids = _term_ids(conn, cid, df)
    postings = [(ids[term], chunk_id, tf, chunk.length)
                for chunk_id, chunk in zip(chunk_ids, terms, strict=True)
                for term, tf in chunk.tf.items()]
    with conn.cursor() as cursor, cursor.copy(
            "COPY lanner_postings (term_id, chunk_id, tf, length) FROM STDIN") as copy:
        for row in postings:
            copy.write_row(row)
    conn.execute("UPDATE lanner_collections SET chunk_count = chunk_count + %s,"
                 " token_count = token_count + %s WHERE id = %s",
                 (len(terms), sum(t.length for t in terms), cid))
    return [[ids[term] for term in chunk.tf] for chunk in terms]


def _term_ids(conn: Any, cid: int, df: dict[str, int]) -> dict[str, int]:
    """Add ``df`` to the collection's document frequencies; every term's id.
    Known terms are updated first, so only new terms take sequence numbers."""
    names, counts = sorted(df), [df[t] for t in sorted(df)]
    found = dict(conn.execute(
        "UPDATE lanner_terms t SET df = t.df + x.n FROM unnest(%s::text[], %s::int[]) AS x(term, n)"
        " WHERE t.collection_id = %s AND t.term = x.term RETURNING t.term, t.id",
        (names, counts, cid)).fetchall())
    new = [t for t in names if t not in found]
    if new:
        found.update(conn.execute(
            "INSERT INTO lanner_terms (collection_id, term, df)"
            " SELECT %s, x.term, x.n FROM unnest(%s::text[], %s::int[]) AS x(term, n)"
            " RETURNING term, id", (cid, new, [df[t] for t in new])).fetchall())
    return found


def remove_terms(conn: Any, cid: int, document_id: int) -> None:
    """Take a document's chunks out of the keyword index (before deleting them)."""
    conn.execute("""
        WITH gone AS (
            DELETE FROM lanner_postings p
            USING (SELECT c.id, unnest(c.term_ids) AS term_id FROM lanner_chunks c
                   WHERE c.document_id = %(doc)s) x
            WHERE p.term_id = x.term_id AND p.chunk_id = x.id
            RETURNING p.term_id)
        UPDATE lanner_terms t SET df = t.df - g.n
        FROM (SELECT term_id, count(*) AS n FROM gone GROUP BY term_id) g
        WHERE t.id = g.term_id""", {"doc": document_id})
    conn.execute("""
        UPDATE lanner_collections SET chunk_count = chunk_count - s.n,
                                      token_count = token_count - s.tokens
        FROM (SELECT count(*) AS n, coalesce(sum(length), 0) AS tokens
              FROM lanner_chunks WHERE document_id = %s) s
        WHERE id = %s""", (document_id, cid))


def drop_terms(conn: Any, cid: int) -> None:
    """The whole collection's keyword index (its terms go with the collection)."""
    conn.execute("DELETE FROM lanner_postings WHERE term_id IN"
                 " (SELECT id FROM lanner_terms WHERE collection_id = %s)", (cid,))


# -- reading it -------------------------------------------------------------------------

BM25_SQL = f"""
WITH stats AS (
    SELECT chunk_count::float8 AS n,
           {K1 * B:g}::float8 * greatest(chunk_count, 1) / greatest(token_count, 1) AS per_token
    FROM lanner_collections WHERE id = %(cid)s),
query AS (
    SELECT t.id, s.per_token,
           q.n * {K1 + 1:g}::float8 * greatest(ln((s.n - t.df + 0.5) / (t.df + 0.5)), 1e-6) AS idf
    FROM unnest(%(terms)s::text[], %(counts)s::int[]) AS q(term, n)
    JOIN lanner_terms t ON t.collection_id = %(cid)s AND t.term = q.term
    CROSS JOIN stats s
    WHERE t.df > 0)
SELECT p.chunk_id,
       sum(q.idf * p.tf / (p.tf + {K1 * (1 - B):g}::float8 + q.per_token * p.length)) AS score
FROM query q JOIN lanner_postings p ON p.term_id = q.id
GROUP BY p.chunk_id ORDER BY score DESC, p.chunk_id LIMIT %(k)s
"""
"""(chunk id, BM25) of the best ``k`` chunks of collection ``cid`` for
``terms`` (each counted ``counts`` times, as FTS5 counts repeated phrases).
BM25's tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / avgdl)), rearranged
so that each posting costs three float8 operations (no numeric arithmetic)."""

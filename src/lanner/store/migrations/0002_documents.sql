-- Document collections for answers grounded in the user's files (lanner.rag).
-- Text and metadata live here; keyword search is FTS5 (BM25); vectors are
-- float32 BLOBs that the store loads into one numpy matrix per collection
-- (measured: exact search over 100k x 384 takes a few ms; this Python's
-- sqlite3 cannot load extensions such as sqlite-vec).

CREATE TABLE collections (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    embedder    TEXT NOT NULL,             -- embedder spec, see rag/embed.py
    dimensions  INTEGER NOT NULL,
    version     INTEGER NOT NULL DEFAULT 0, -- bumped by every write: invalidates cached vectors
    created_at  TEXT NOT NULL
);

CREATE TABLE documents (
    id             INTEGER PRIMARY KEY,
    collection_id  INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    path           TEXT NOT NULL,          -- absolute, resolved
    sha256         TEXT NOT NULL,          -- of the file's bytes
    pages          INTEGER NOT NULL,
    ingested_at    TEXT NOT NULL,
    UNIQUE (collection_id, path)
);

CREATE TABLE chunks (
    id             INTEGER PRIMARY KEY,
    document_id    INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    collection_id  INTEGER NOT NULL,       -- copied from the document: one index scan per collection
    page           INTEGER,                -- 1-based for PDFs, NULL otherwise
    start_char     INTEGER NOT NULL,       -- page_text[start_char:end_char] == text
    end_char       INTEGER NOT NULL,
    heading        TEXT NOT NULL,
    text           TEXT NOT NULL,
    embedding      BLOB NOT NULL           -- little-endian float32, unit length
);

CREATE INDEX chunks_document ON chunks(document_id);
CREATE INDEX chunks_collection ON chunks(collection_id, id);

-- Contentless (the text lives in chunks): the index alone answers a query.
-- The column "collection" holds one token, 'c<collection id>', so a query
-- is restricted to its collection inside FTS5 (joining chunks to filter
-- was 5x slower at 100k chunks; see benchmarks/rag_speed.py).
CREATE VIRTUAL TABLE chunks_fts USING fts5(
    text, heading, collection, content = '',
    tokenize = 'porter unicode61 remove_diacritics 2'
);

CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts (rowid, text, heading, collection)
        VALUES (new.id, new.text, new.heading, 'c' || new.collection_id);
END;

CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts (chunks_fts, rowid, text, heading, collection)
        VALUES ('delete', old.id, old.text, old.heading, 'c' || old.collection_id);
END;

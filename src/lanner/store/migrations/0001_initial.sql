-- Lanner's log, schema 1: conversations, the responses logged in them with
-- their provenance, and the cache of model-file hashes.
-- The migration runner wraps this file in one transaction and records it in
-- _migrations; do not put BEGIN/COMMIT here.

CREATE TABLE conversations (
    id          TEXT PRIMARY KEY,          -- time-sortable hex id (see store/turn.py)
    model       TEXT NOT NULL,             -- model name the conversation started with
    title       TEXT,
    created_at  TEXT NOT NULL              -- UTC ISO 8601
);

CREATE TABLE responses (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: log order
    conversation_id    TEXT NOT NULL REFERENCES conversations(id),
    parent_id          INTEGER REFERENCES responses(id),   -- set on a strategy's sub-calls
    model              TEXT NOT NULL,
    model_path         TEXT NOT NULL,
    model_sha256       TEXT NOT NULL,
    backend            TEXT NOT NULL,
    backend_version    TEXT NOT NULL,
    chat_format        TEXT NOT NULL,
    chat_format_hash   TEXT NOT NULL,
    system             TEXT,
    prompt             TEXT NOT NULL,
    response           TEXT NOT NULL,
    messages_json      TEXT NOT NULL,      -- the full message list sent, as JSON
    sampling_json      TEXT NOT NULL,      -- sampling settings, as JSON
    seed               INTEGER,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    finish_reason      TEXT NOT NULL,
    ttft_s             REAL NOT NULL,
    total_s            REAL NOT NULL,
    created_at         TEXT NOT NULL       -- UTC ISO 8601
);

CREATE INDEX responses_conversation ON responses(conversation_id, id);
CREATE INDEX responses_model ON responses(model, id);

-- sha256 of model files, reused while the file's size and mtime are unchanged.
CREATE TABLE file_hashes (
    path       TEXT PRIMARY KEY,           -- absolute, resolved
    size       INTEGER NOT NULL,
    mtime_ns   INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    hashed_at  TEXT NOT NULL
);

-- Schema 3: evaluation runs with their provenance, and every item's input,
-- output and scores (so two runs can be compared item by item).

CREATE TABLE eval_runs (
    id                TEXT PRIMARY KEY,      -- time-sortable hex id (see store/turn.py)
    task              TEXT NOT NULL,         -- the task's name
    task_path         TEXT NOT NULL,         -- its YAML file
    task_sha256       TEXT NOT NULL,         -- hash of the YAML and its data files
    model             TEXT NOT NULL,
    model_path        TEXT NOT NULL,
    model_sha256      TEXT NOT NULL,
    backend           TEXT NOT NULL,
    backend_version   TEXT NOT NULL,
    weights           TEXT NOT NULL,         -- what runs: gguf file type, or the torch dtype
    chat_format_hash  TEXT,                  -- NULL when the task uses no chat format
    num_fewshot       INTEGER NOT NULL,
    fewshot_seed      INTEGER NOT NULL,
    item_limit        INTEGER,               -- --limit, NULL for every item
    config_json       TEXT NOT NULL,         -- the resolved task config and run options
    metrics_json      TEXT NOT NULL,         -- {"acc": {"value": .., "stderr": ..}, ...}
    n_items           INTEGER NOT NULL,
    duration_s        REAL NOT NULL,
    created_at        TEXT NOT NULL          -- UTC ISO 8601
);

CREATE INDEX eval_runs_task ON eval_runs(task, created_at);

CREATE TABLE eval_items (
    run_id        TEXT NOT NULL REFERENCES eval_runs(id) ON DELETE CASCADE,
    doc_id        INTEGER NOT NULL,          -- the item's index in the task's test split
    prompt        TEXT NOT NULL,             -- the full context sent (few-shot examples included)
    target        TEXT NOT NULL,             -- the reference answer, as text
    output_json   TEXT NOT NULL,             -- loglikelihoods per choice, or the generated text
    scores_json   TEXT NOT NULL,             -- {"acc": 1.0, ...}
    PRIMARY KEY (run_id, doc_id)
);

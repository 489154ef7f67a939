-- Schema 4: blind arena battles (lanner.evals.arena). A battle is one prompt
-- answered by two models shown as A and B; its vote is filled in once, later.
-- Both answers are also logged turns in responses (response_a, response_b).

CREATE TABLE arena_battles (
    id           TEXT PRIMARY KEY,          -- time-sortable hex id (see store/turn.py)
    prompt       TEXT NOT NULL,
    system       TEXT,
    model_a      TEXT NOT NULL,             -- the model shown as A
    model_b      TEXT NOT NULL,
    answer_a     TEXT NOT NULL,
    answer_b     TEXT NOT NULL,
    response_a   INTEGER REFERENCES responses(id),  -- the logged turn of each answer
    response_b   INTEGER REFERENCES responses(id),
    created_at   TEXT NOT NULL,             -- UTC ISO 8601
    winner       TEXT CHECK (winner IN ('a', 'b', 'tie', 'both_bad')),  -- NULL until voted
    voted_at     TEXT,                      -- UTC ISO 8601, set with winner
    CHECK ((winner IS NULL) = (voted_at IS NULL))
);

CREATE INDEX arena_battles_voted ON arena_battles(voted_at);

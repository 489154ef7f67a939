-- Schema 7: what an answer cost on a priced remote engine (prices.toml in the
-- Lanner home), and its currency; NULL for local models and unpriced remotes.

ALTER TABLE responses ADD COLUMN cost REAL;
ALTER TABLE responses ADD COLUMN currency TEXT;

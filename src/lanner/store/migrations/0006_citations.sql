-- Schema 6: a documents answer's citations beside its text: the sources it was
-- given (file, page, span, passage text) and each citation with its check, as
-- the chat completion's "citations" object; 'null' for every other answer.
-- The web UI reopens a cited answer from the log with its passages.

ALTER TABLE responses ADD COLUMN citations_json TEXT NOT NULL DEFAULT 'null';

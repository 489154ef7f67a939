-- Schema 5: how the model of a response was set up where that changes its
-- numbers: the context window and RoPE scaling ({"n_ctx": .., "rope_scaling":
-- {"type": "yarn", "factor": 2.0, "original_context": 8192} or null}).

ALTER TABLE responses ADD COLUMN model_settings_json TEXT NOT NULL DEFAULT '{}';

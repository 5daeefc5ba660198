-- weights_create: the importance-weights table (SPEC 8, 11), written by `weights` (queries/weights.py).
-- One row per (prompt, sample); a new run for a prompt replaces that prompt's rows.
CREATE TABLE IF NOT EXISTS weights (
    prompt            VARCHAR NOT NULL,  -- the prompt text, or embedding:<file> for a given embedding
    uid               VARCHAR NOT NULL,
    vec_id            BIGINT  NOT NULL,
    logit_scale       DOUBLE  NOT NULL,  -- a' (default 10)
    cosine            DOUBLE  NOT NULL,  -- <v_x, v_t>, x = the sample's image
    log_weight        DOUBLE  NOT NULL,  -- a' * cosine
    weight            DOUBLE  NOT NULL,  -- w = exp(a' * cosine)
    normalized_weight DOUBLE  NOT NULL   -- w / mean(w) over the pool (mean 1)
)

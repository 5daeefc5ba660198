-- Bookkeeping of `score` runs (queries/score.py). The `scores` table itself is created by each run
-- (its columns depend on the metrics computed) and replaced atomically.
CREATE TABLE IF NOT EXISTS score_runs (
    run_id          INTEGER   NOT NULL,  -- 1, 2, ... in order of completion
    created_at      TIMESTAMP NOT NULL,
    exact           BOOLEAN   NOT NULL,  -- TRUE: kl/klr over the whole pool (SPEC 2), else SPEC 3
    side            VARCHAR   NOT NULL,  -- both | text | image
    metrics         VARCHAR[] NOT NULL,  -- metrics asked for (kl, klr, dc, ..., clipscore)
    columns         VARCHAR[] NOT NULL,  -- score columns written by this run
    k               INTEGER,             -- top-k neighbours (NULL for exact or no KL)
    tail_sample     INTEGER,             -- m, the uniform tail sample size
    seed            BIGINT    NOT NULL,
    logit_scale     DOUBLE    NOT NULL,  -- a
    logit_bias      DOUBLE,              -- SigLIP b; NULL for CLIP
    image_index     VARCHAR,             -- FAISS keys searched (image index: text-side KL)
    text_index      VARCHAR,
    nprobe          INTEGER,             -- IVF lists visited per query (NULL: no lists, or no KL)
    dots_per_query  JSON,                -- {"text": .., "image": ..}: dot products per query
    seconds         JSON,                -- per-phase durations
    duration_s      DOUBLE    NOT NULL   -- wall time of the whole run
);

-- `score --check N`: approximate vs exact scores on N random samples, one row per KL column.
CREATE TABLE IF NOT EXISTS score_checks (
    run_id          INTEGER   NOT NULL,
    column_name     VARCHAR   NOT NULL,  -- kl_text, klr_image, ...
    n_checked       INTEGER   NOT NULL,
    seed            BIGINT    NOT NULL,
    spearman        DOUBLE,              -- rank correlation, approximate vs exact
    mae             DOUBLE,              -- mean |approximate - exact|
    max_abs_error   DOUBLE,
    top25_overlap   DOUBLE               -- |top25%(approx) ∩ top25%(exact)| / |top25%(exact)|
);

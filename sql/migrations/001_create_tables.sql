-- The build-time tables of an index catalog. `samples` is created by the builder from the
-- source's own columns (vec_id, uid, caption, then every source metadata column).
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);

CREATE TABLE IF NOT EXISTS manifest (
    format_version  INTEGER NOT NULL,
    source          VARCHAR NOT NULL,   -- synthetic | open_clip | datacomp | clip-retrieval
    synthetic       BOOLEAN NOT NULL,   -- TRUE: the built-in synthetic CLIP-like world, not real data
    model           VARCHAR,            -- open_clip model name / embedding family
    pretrained      VARCHAR,            -- pretrained tag or checkpoint path
    dim             INTEGER NOT NULL,
    logit_scale     DOUBLE  NOT NULL,   -- a = exp(logit_scale parameter)
    logit_bias      DOUBLE,             -- SigLIP bias b, NULL for CLIP
    n               BIGINT  NOT NULL,
    raw_known       BOOLEAN NOT NULL,   -- raw (unnormalised) embedding norms are stored
    embedding_dtype VARCHAR NOT NULL,   -- float16 | float32
    image_index     VARCHAR NOT NULL,   -- FAISS factory string
    text_index      VARCHAR NOT NULL,
    index_params    JSON,               -- e.g. {"nprobe": 16, "nlist": 1024, "gpu": false}
    created_at      TIMESTAMP NOT NULL,
    tool_version    VARCHAR NOT NULL,
    extra           JSON                -- source-specific details (synthetic world parameters, ...)
);

-- Per-modality statistics, vectors and matrices flattened row-major.
-- names: mean, sum, cov (of normalised vectors, ddof=1); raw_mean, raw_cov (raw, when known);
-- whiten_mean, whiten (W = S^-1/2), whiten_logdet (log|det W|, shape [])
CREATE TABLE IF NOT EXISTS modality_stats (
    modality VARCHAR NOT NULL,
    name     VARCHAR NOT NULL,
    shape    INTEGER[] NOT NULL,
    value    DOUBLE[] NOT NULL
);

-- The build's first batch of samples (registered Arrow table _batch) creates the samples table with
-- the source's own columns: vec_id, uid, caption, then every source metadata column.
CREATE TABLE samples AS SELECT * FROM _batch

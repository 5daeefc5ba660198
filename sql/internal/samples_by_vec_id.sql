-- The rows of samples for a list of vec_ids. queries.weights.lookup_samples appends the
-- placeholders, `(?, ?, ...)`, one bound parameter per vec_id, so that DuckDB uses the
-- samples_vec_id index (a list bound as one parameter, `= ANY($ids)`, is not an index scan).
SELECT vec_id, uid, caption
FROM samples
WHERE vec_id IN

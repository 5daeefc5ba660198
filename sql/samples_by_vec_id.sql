-- The rows of samples for a list of vec_ids. The builder's caller appends the placeholders:
-- `WHERE vec_id IN (?, ?, ...)`, one bound parameter per vec_id, so that DuckDB uses the
-- samples_vec_id index (a list bound as one parameter, `= ANY($ids)`, is not an index scan).
SELECT vec_id, uid, caption
FROM samples
WHERE vec_id IN

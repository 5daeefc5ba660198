-- The rows of samples for many vec_ids: a semi-join with the registered Arrow table _ids(vec_id)
-- (queries.weights.lookup_samples, beyond LOOKUP_MAX ids, where point lookups stop paying).
SELECT s.vec_id, s.uid, s.caption
FROM samples AS s
SEMI JOIN _ids USING (vec_id)

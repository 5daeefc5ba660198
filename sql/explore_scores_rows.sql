-- The scores rows for a list of vec_ids (queries.explore.cards appends the placeholders
-- `(?, ?, ...)`, one bound parameter per vec_id).
SELECT *
FROM scores
WHERE vec_id IN

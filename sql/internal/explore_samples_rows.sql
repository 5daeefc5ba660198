-- The samples rows (every metadata column) for a list of vec_ids (queries.explore.cards appends
-- the placeholders `(?, ?, ...)`, one bound parameter per vec_id, as samples_by_vec_id does).
SELECT *
FROM samples
WHERE vec_id IN

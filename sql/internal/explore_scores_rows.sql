-- The scores rows for a list of vec_ids: a semi-join with the registered Arrow table _ids(vec_id)
-- (queries.explore.cards). scores has no index on vec_id: an IN list of 24 bound values took
-- ~180 ms at 300k rows, the semi-join ~25 ms.
SELECT s.*
FROM scores AS s
SEMI JOIN _ids USING (vec_id)

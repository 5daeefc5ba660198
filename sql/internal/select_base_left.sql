-- The rows of _select_base still in a `select --keep --mode filtered` selection: those whose vec_id
-- is in the registered Arrow table _keep_left(vec_id) (queries.keep).
SELECT *
FROM _select_base
WHERE vec_id IN (SELECT vec_id FROM _keep_left)

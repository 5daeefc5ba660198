-- The rows a `select --keep` kept (queries.keep): uid, vec_id and each keep's column ({{columns}},
-- from the allowlist of numeric columns of samples and scores), for the vec_ids in the registered
-- Arrow table _keep_ids(vec_id).
SELECT uid, vec_id, {{columns}}
FROM _select_base
WHERE vec_id IN (SELECT vec_id FROM _keep_ids)

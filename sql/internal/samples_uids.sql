-- Every uid, in vec_id order (queries.weighting: `weights --out` exports uid and weights by row).
SELECT uid
FROM samples
ORDER BY vec_id

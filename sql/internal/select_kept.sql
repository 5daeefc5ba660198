-- The $kept rows `select` keeps (queries.select) from _select_passed: the highest scores (the
-- lowest when $lowest), ties broken by uid ascending; NULL and NaN scores cannot be ranked.
WITH top AS (
    SELECT uid, vec_id, score
    FROM _select_passed
    WHERE score IS NOT NULL AND NOT isnan(score::DOUBLE)
    ORDER BY CASE WHEN $lowest THEN score END ASC, CASE WHEN $lowest THEN NULL ELSE score END DESC, uid ASC
    LIMIT $kept
)
SELECT
    row_number() OVER (
        ORDER BY CASE WHEN $lowest THEN score END ASC, CASE WHEN $lowest THEN NULL ELSE score END DESC, uid ASC
    ) AS rank,
    uid, vec_id, score
FROM top
ORDER BY rank

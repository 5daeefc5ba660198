-- name: bottom_by_score
-- description: The samples with the LOWEST value of a score column: rank, vec_id, uid, caption (with url and image_path when samples has them) and the score (ties broken by uid).
-- param: column (column, default kl_text): the score column to rank by (any numeric column of scores)
-- param: limit (int>=0, default 20): how many samples
SELECT
    row_number() OVER (ORDER BY sc.{{column}} ASC, sm.uid) AS rank,
    sm.vec_id,
    sm.uid,
    COLUMNS('^(caption|url|image_path)$'),  -- the caption, and the url / image_path where the pool has them
    sc.{{column}}
FROM scores AS sc
JOIN samples AS sm USING (vec_id)
WHERE sc.{{column}} IS NOT NULL AND NOT isnan(sc.{{column}}::DOUBLE)
ORDER BY rank
LIMIT $limit

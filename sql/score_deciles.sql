-- name: score_deciles
-- description: Deciles (equal-count buckets, lowest scores in bucket 1) of a score column: count, min, max, mean and example captions per bucket. Examples are picked by a hash of the uid: deterministic and spread over the bucket.
-- param: column (column, default kl_text): the score column (any numeric column of scores)
-- param: buckets (int>=1, default 10): number of equal-count buckets (10 = deciles, 4 = quartiles)
-- param: examples (int>=0, default 3): example captions per bucket
WITH s AS (
    SELECT sm.uid, sm.caption, sc.{{column}}::DOUBLE AS score
    FROM scores AS sc
    JOIN samples AS sm USING (vec_id)
    WHERE sc.{{column}} IS NOT NULL AND NOT isnan(sc.{{column}}::DOUBLE)
),
b AS (
    SELECT *, ntile($buckets) OVER (ORDER BY score, uid) AS bucket FROM s
)
SELECT
    bucket,
    count(*)                                                        AS n,
    min(score)                                                      AS min,
    max(score)                                                      AS max,
    avg(score)                                                      AS mean,
    list_slice(list(caption ORDER BY hash(uid), uid), 1, $examples) AS examples
FROM b
GROUP BY bucket
ORDER BY bucket

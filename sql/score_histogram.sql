-- name: score_histogram
-- description: Histogram of a score column: equal-width bins from its min to its max (finite values only), with bin, count and the bin's edges.
-- param: column (column, default kl_text): the score column
-- param: bins (int>=1, default 40): number of bins
WITH s AS (
    SELECT {{column}}::DOUBLE AS v
    FROM scores
    WHERE {{column}} IS NOT NULL AND isfinite({{column}}::DOUBLE)
),
r AS (SELECT min(v) AS lo, max(v) AS hi FROM s),
b AS (
    SELECT coalesce(least(floor((v - lo) / nullif(hi - lo, 0) * $bins), $bins - 1), 0)::BIGINT AS bin
    FROM s, r
)
SELECT
    bin,
    count(*)                                                       AS n,
    any_value(r.lo) + bin * (any_value(r.hi) - any_value(r.lo)) / $bins       AS lo,
    any_value(r.lo) + (bin + 1) * (any_value(r.hi) - any_value(r.lo)) / $bins AS hi
FROM b, r
GROUP BY bin
ORDER BY bin

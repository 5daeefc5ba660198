-- name: score_decile_bounds
-- description: The 9 decile boundaries of a score column (quantile_disc at 0.1 ... 0.9 over its non-NULL, non-NaN values) and the count: decile d holds bound[d-1] <= score < bound[d] (the explorer's deciles; ties at a boundary go up).
-- param: column (column, default kl_text): the score column
SELECT
    count(*) AS n,
    quantile_disc({{column}}::DOUBLE, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]) AS bounds
FROM scores
WHERE {{column}} IS NOT NULL AND NOT isnan({{column}}::DOUBLE)

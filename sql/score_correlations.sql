-- name: score_correlations
-- description: The paper's correlation table (SPEC 10): Pearson and Spearman correlation of conformity, whitened log-likelihood and raw norm against D_KL, D_KLR, D_C and D_W, per side (image scores with image scores, text with text). Spearman = Pearson of average ranks (ties share their mean rank). NULL where a score is unknown (raw norm of normalised-only sources).
WITH long AS (
    SELECT vec_id, col, val
    FROM scores
    UNPIVOT INCLUDE NULLS (
        val FOR col IN (
            conformity_image, loglik_image, rawnorm_image, kl_image, klr_image, dc_image, dw_image,
            conformity_text,  loglik_text,  rawnorm_text,  kl_text,  klr_text,  dc_text,  dw_text
        )
    )
),
ranked AS (
    SELECT
        vec_id,
        regexp_extract(col, '^(.*)_(image|text)$', 1) AS measure,
        regexp_extract(col, '^(.*)_(image|text)$', 2) AS side,
        val::DOUBLE AS val,
        CASE WHEN val IS NOT NULL THEN
            (rank() OVER (PARTITION BY col ORDER BY val ASC NULLS LAST)
             + count(val) OVER (PARTITION BY col) + 1
             - rank() OVER (PARTITION BY col ORDER BY val DESC NULLS LAST)) / 2.0
        END AS r
    FROM long
),
pairs AS (
    SELECT
        x.side,
        x.measure                                                        AS measure,
        y.measure                                                        AS against,
        corr(x.val, y.val)                                               AS pearson,
        corr(x.r, y.r)                                                   AS spearman,
        count(*) FILTER (WHERE x.val IS NOT NULL AND y.val IS NOT NULL)  AS n
    FROM ranked AS x
    JOIN ranked AS y ON x.vec_id = y.vec_id AND x.side = y.side
    WHERE x.measure IN ('conformity', 'loglik', 'rawnorm')
      AND y.measure IN ('kl', 'klr', 'dc', 'dw')
    GROUP BY ALL
)
SELECT
    side,
    measure,
    m.method,
    max(CASE WHEN against = 'kl'  THEN CASE m.method WHEN 'pearson' THEN pearson ELSE spearman END END) AS kl,
    max(CASE WHEN against = 'klr' THEN CASE m.method WHEN 'pearson' THEN pearson ELSE spearman END END) AS klr,
    max(CASE WHEN against = 'dc'  THEN CASE m.method WHEN 'pearson' THEN pearson ELSE spearman END END) AS dc,
    max(CASE WHEN against = 'dw'  THEN CASE m.method WHEN 'pearson' THEN pearson ELSE spearman END END) AS dw,
    min(n)                                                                                               AS n
FROM pairs
CROSS JOIN (VALUES ('pearson'), ('spearman')) AS m(method)
GROUP BY side, measure, m.method
ORDER BY side, measure, m.method

-- name: weights_summary
-- description: Importance weights stored by `weights` (SPEC 8), one row per prompt: n, logit scale a', effective sample size ESS = (sum w)^2 / sum w^2, ESS / n, min / median / max normalized weight, and the share of the total weight held by the top 1% of samples (ceil(n / 100) samples).
-- param: prompt (text, default NULL): only this prompt (default: every stored prompt)
WITH w AS (
    SELECT prompt, logit_scale, normalized_weight AS nw,
           row_number() OVER (PARTITION BY prompt ORDER BY normalized_weight DESC, vec_id) AS r,
           count(*) OVER (PARTITION BY prompt) AS n
    FROM weights
    WHERE $prompt::VARCHAR IS NULL OR prompt = $prompt::VARCHAR
)
SELECT
    prompt,
    any_value(n)                                            AS n,
    any_value(logit_scale)                                  AS logit_scale,
    sum(nw) * sum(nw) / sum(nw * nw)                        AS ess,
    sum(nw) * sum(nw) / sum(nw * nw) / any_value(n)         AS ess_fraction,
    min(nw)                                                 AS min,
    median(nw)                                              AS median,
    max(nw)                                                 AS max,
    sum(nw) FILTER (WHERE r <= ceil(n / 100.0)) / sum(nw)   AS top1_share
FROM w
GROUP BY prompt
ORDER BY prompt

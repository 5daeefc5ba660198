-- kl_per_sample: the top-k + sampled-tail (MIMPS) estimate of D_KL and D_KLR per query (SPEC 3).
--
-- Inputs (arrow tables registered by queries.estimate.kl_from_lists):
--   neighbours(query, candidate, rank, score)
--       K: the k_q nearest candidates of each query (k_q <= k when an IVF probe found fewer),
--       score = s_j = a <v_q, v_j>.
--   tails(query, shift, tail_sum, tail_sum_s, tail_m, mean_s)   -- one row per query
--       sums over the query's tail R \ K (the tail sample R without the query's own neighbours,
--       left out where the sums are taken), relative to the query's max-shift:
--       tail_sum = sum_{R\K} e^(s_j - shift), tail_sum_s = sum_{R\K} e^(s_j - shift) s_j,
--       tail_m = |R \ K|; shift = max(best neighbour score, max_R s_j), so every exponential here
--       is <= 1; mean_s = a <v_q, sum_j v_j> / N, the exact mean score over all N candidates.
--       (Subtracting R ∩ K here instead, from two differently rounded score computations, left
--       errors of up to 0.15 nats once multiplied by the weight w below.)
-- Parameters: $n = N, the number of candidates; $bias = the SigLIP logit bias b, or NULL for CLIP.
--
-- Per query, everything scaled by e^-shift:
--   w      = (N - k_q) / |R \ K|                       (0 when R \ K is empty, e.g. m = 0 or k = N)
--   Z'     = sum_K e^(s - shift) + w * sum_{R\K} e^(s - shift)            Z_hat = e^shift * Z'
--   E_hat  = (sum_K e^(s - shift) s + w * sum_{R\K} e^(s - shift) s) / Z'
--   log Z_hat = shift + ln Z'
--   D_KL, D_KLR = kl_scores(log Z_hat, E_hat, mean_s, N, b)    (the macro of kl_formula.sql, SPEC 2)
-- A query with neither neighbours nor tail (Z' = 0) gets NULL scores.
WITH head AS (
    -- the exact head K
    SELECT
        n.query,
        count(*)                                                    AS k_q,
        sum(exp(n.score - t.shift))                                 AS head_sum,
        sum(exp(n.score - t.shift) * n.score)                       AS head_sum_s
    FROM neighbours AS n
    JOIN tails AS t ON t.query = n.query
    GROUP BY n.query
),
parts AS (
    -- every query of `tails`, also those without any neighbour
    SELECT
        t.query,
        t.shift,
        t.mean_s,
        coalesce(h.head_sum, 0)                                     AS head_sum,
        coalesce(h.head_sum_s, 0)                                   AS head_sum_s,
        CASE WHEN t.tail_m > 0
             THEN ($n - coalesce(h.k_q, 0))::DOUBLE / t.tail_m
             ELSE 0 END                                             AS w,
        t.tail_sum                                                  AS rest_sum,
        t.tail_sum_s                                                AS rest_sum_s
    FROM tails AS t
    LEFT JOIN head AS h ON h.query = t.query
),
z AS (
    SELECT
        query,
        mean_s,
        shift + ln(nullif(head_sum + w * rest_sum, 0))              AS log_z,
        (head_sum_s + w * rest_sum_s) / nullif(head_sum + w * rest_sum, 0) AS e_s
    FROM parts
)
SELECT
    query,
    unnest(kl_scores(log_z, e_s, mean_s, $n, $bias::DOUBLE))        -- the columns kl, klr
FROM z
ORDER BY query

-- kl_per_sample: the top-k + sampled-tail (MIMPS) estimate of D_KL and D_KLR per query (SPEC 3).
--
-- Inputs (arrow tables registered by queries.estimate.kl_from_lists):
--   neighbours(query, candidate, rank, score)
--       K: the k_q nearest candidates of each query (k_q <= k when an IVF probe found fewer),
--       score = s_j = a <v_q, v_j>.
--   tails(query, shift, tail_sum, tail_sum_s, tail_m, mean_s)   -- one row per query
--       sums over ALL of the tail sample R, relative to the query's max-shift:
--       tail_sum = sum_R e^(s_j - shift), tail_sum_s = sum_R e^(s_j - shift) s_j, tail_m = |R|;
--       shift = max(best neighbour score, max_R s_j), so every exponential here is <= 1;
--       mean_s = a <v_q, sum_j v_j> / N, the exact mean score over all N candidates.
--   tail_members(candidate)
--       the ids of R. R ∩ K is found by joining it with the neighbour list and subtracted from
--       the tail sums, so the tail is R \ K.
-- Parameters: $n = N, the number of candidates; $bias = the SigLIP logit bias b, or NULL for CLIP.
--
-- Per query, everything scaled by e^-shift:
--   w      = (N - k_q) / |R \ K|                       (0 when R \ K is empty, e.g. m = 0 or k = N)
--   Z'     = sum_K e^(s - shift) + w * sum_{R\K} e^(s - shift)            Z_hat = e^shift * Z'
--   E_hat  = (sum_K e^(s - shift) s + w * sum_{R\K} e^(s - shift) s) / Z'
--   log Z_hat = shift + ln Z'
--   CLIP:    D_KL  = E_hat - log Z_hat + log N        D_KLR = log Z_hat - log N - mean_s
--   SigLIP:  D_KL  = E_hat + log(N - 1) + b           D_KLR = -log(N - 1) - b - mean_s
-- A query with neither neighbours nor tail (Z' = 0) gets NULL scores.
WITH head AS (
    -- the exact head K, and the part of the tail sums that falls inside K (R ∩ K)
    SELECT
        nb.query,
        count(*)                                                    AS k_q,
        sum(nb.e)                                                   AS head_sum,
        sum(nb.e * nb.score)                                        AS head_sum_s,
        count(r.candidate)                                          AS overlap_m,
        coalesce(sum(nb.e) FILTER (WHERE r.candidate IS NOT NULL), 0)            AS overlap_sum,
        coalesce(sum(nb.e * nb.score) FILTER (WHERE r.candidate IS NOT NULL), 0) AS overlap_sum_s
    FROM (
        SELECT n.query, n.candidate, n.score, exp(n.score - t.shift) AS e
        FROM neighbours AS n
        JOIN tails AS t ON t.query = n.query
    ) AS nb
    LEFT JOIN tail_members AS r ON r.candidate = nb.candidate
    GROUP BY nb.query
),
parts AS (
    -- every query of `tails`, also those without any neighbour
    SELECT
        t.query,
        t.shift,
        t.mean_s,
        coalesce(h.head_sum, 0)                                     AS head_sum,
        coalesce(h.head_sum_s, 0)                                   AS head_sum_s,
        CASE WHEN t.tail_m - coalesce(h.overlap_m, 0) > 0
             THEN ($n - coalesce(h.k_q, 0))::DOUBLE / (t.tail_m - coalesce(h.overlap_m, 0))
             ELSE 0 END                                             AS w,
        -- R \ K sums; rounding between the two score computations can leave a tiny negative
        greatest(t.tail_sum - coalesce(h.overlap_sum, 0), 0)        AS rest_sum,
        t.tail_sum_s - coalesce(h.overlap_sum_s, 0)                 AS rest_sum_s
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
    CASE WHEN $bias::DOUBLE IS NULL THEN e_s - log_z + ln($n)
         ELSE e_s + ln($n - 1) + $bias::DOUBLE END                  AS kl,
    CASE WHEN $bias::DOUBLE IS NULL THEN log_z - ln($n) - mean_s
         ELSE -ln($n - 1) - $bias::DOUBLE - mean_s END              AS klr
FROM z
ORDER BY query

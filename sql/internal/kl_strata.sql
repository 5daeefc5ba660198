-- kl_strata: the stratified (scanned lists + calibrated model) estimate of D_KL and D_KLR per query
-- (SPEC 3.2; queries/strata.py).
--
-- Input (arrow table registered by queries.strata.strata_kl):
--   partials(query, shift, scanned_sum, scanned_sum_s, scanned_n, model_sum, model_sum_s, mean_s)
--       one row per query; s_j = a <v_q, v_j>; everything relative to the query's max-shift
--       (shift = its largest scanned score):
--       scanned_sum   = sum_{scanned j} e^(s_j - shift)          exact, over the lists it scanned
--       scanned_sum_s = sum_{scanned j} e^(s_j - shift) s_j
--       scanned_n     = how many candidates that was (not used here; cost accounting)
--       model_sum     = sum_{unscanned lists l} |l| exp(m_l + gamma v_l / 2 - shift)   log-normal model,
--       model_sum_s   = sum_{unscanned lists l} that * (m_l + gamma v_l)                 calibrated gamma
--       mean_s        = a <v_q, sum_j v_j> / N, the exact mean score over all N candidates.
-- Parameters: $n = N, the number of candidates; $bias = the SigLIP logit bias b, or NULL for CLIP.
--
-- Per query:
--   Z'     = scanned_sum + model_sum                  Z_hat = e^shift * Z',   log Z_hat = shift + ln Z'
--   E_hat  = (scanned_sum_s + model_sum_s) / Z'
--   D_KL, D_KLR = kl_scores(log Z_hat, E_hat, mean_s, N, b)    (the macro of kl_formula.sql, SPEC 2)
--   model_share = model_sum / Z'   (the modelled part of Z: what a wider scan would replace)
-- With every list scanned (model_sum = 0) this is SPEC section 2 exactly. Z' = 0 gives NULL scores.
WITH z AS (
    SELECT
        query,
        mean_s,
        shift + ln(nullif(scanned_sum + model_sum, 0))                        AS log_z,
        (scanned_sum_s + model_sum_s) / nullif(scanned_sum + model_sum, 0)    AS e_s,
        model_sum / nullif(scanned_sum + model_sum, 0)                        AS model_share
    FROM partials
)
SELECT
    query,
    unnest(kl_scores(log_z, e_s, mean_s, $n, $bias::DOUBLE)),                -- the columns kl, klr
    model_share
FROM z
ORDER BY query

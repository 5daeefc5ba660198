-- kl_formula: D_KL and D_KLR of one query from its (estimated) softmax over N candidates (SPEC 2):
-- the one place of the formula that the estimators' statements (kl_per_sample, kl_strata) apply.
-- queries/kl_sql.py creates it on their DuckDB connection before running them.
--
-- Arguments, with s_j = a <v_q, v_j> over the N candidates j:
--   log_z  = log Z_hat, Z_hat = sum_j e^(s_j)                  (estimated)
--   e_s    = E_hat[s] = sum_j e^(s_j) s_j / Z_hat              (estimated)
--   mean_s = (1/N) sum_j s_j                                   (exact)
--   n      = N;  bias = the SigLIP logit bias b, or NULL for CLIP
-- Returns STRUCT(kl DOUBLE, klr DOUBLE):
--   CLIP:    D_KL  = E_hat - log Z_hat + log N        D_KLR = log Z_hat - log N - mean_s
--   SigLIP:  D_KL  = E_hat + log(N - 1) + b           D_KLR = -log(N - 1) - b - mean_s
-- (SELECT unnest(kl_scores(...)) gives the two columns kl and klr.) NULL log_z / e_s give NULL scores.
CREATE OR REPLACE TEMP MACRO kl_scores(log_z, e_s, mean_s, n, bias) AS {
    'kl':  CASE WHEN bias IS NULL THEN e_s - log_z + ln(n)
                ELSE e_s + ln(n - 1) + bias END,
    'klr': CASE WHEN bias IS NULL THEN log_z - ln(n) - mean_s
                ELSE -ln(n - 1) - bias - mean_s END
}

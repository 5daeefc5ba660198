-- The held-out accuracy checks of one score run (SPEC 3.2), one row per KL column.
SELECT column_name, n_checked, spearman, spearman_lo, spearman_hi, top25_overlap, top25_overlap_lo,
       top25_overlap_hi, mae, mae_lo, mae_hi, max_abs_error
FROM score_checks
WHERE run_id = $run_id
ORDER BY column_name

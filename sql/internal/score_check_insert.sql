-- One row of a score run's accuracy check: approximate vs exact agreement of one KL column on
-- held-out rows, with bootstrap 95% intervals.
INSERT INTO score_checks (run_id, column_name, n_checked, seed, spearman, mae, max_abs_error,
                          top25_overlap, spearman_lo, spearman_hi, top25_overlap_lo,
                          top25_overlap_hi, mae_lo, mae_hi)
VALUES ($run_id, $column_name, $n_checked, $seed, $spearman, $mae, $max_abs_error, $top25_overlap,
        $spearman_lo, $spearman_hi, $top25_overlap_lo, $top25_overlap_hi, $mae_lo, $mae_hi)

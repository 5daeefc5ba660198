-- One row of `score --check`: approximate vs exact agreement of one KL column.
INSERT INTO score_checks VALUES ($run_id, $column_name, $n_checked, $seed, $spearman, $mae,
                                 $max_abs_error, $top25_overlap)

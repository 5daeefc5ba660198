-- Record one finished `score` run (queries/score.py); returns its run_id.
INSERT INTO score_runs (run_id, created_at, exact, side, metrics, columns, k, tail_sample, seed,
                        logit_scale, logit_bias, image_index, text_index, nprobe, dots_per_query,
                        seconds, duration_s, estimator, reason, precision, details)
SELECT coalesce(max(run_id), 0) + 1, $created_at, $exact, $side, $metrics, $columns, $k,
       $tail_sample, $seed, $logit_scale, $logit_bias, $image_index, $text_index, $nprobe,
       $dots_per_query, $seconds, $duration_s, $estimator, $reason, $precision,
       $details
FROM score_runs
RETURNING run_id

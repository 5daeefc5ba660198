-- Per side, the figures of the estimator a score run used (strata: lists, calibrated gamma,
-- calibration rows, scanned fraction).
ALTER TABLE score_runs ADD COLUMN IF NOT EXISTS details JSON;

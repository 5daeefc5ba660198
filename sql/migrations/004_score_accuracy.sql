-- SPEC 3.2: which estimator a `score` run used, and the accuracy each approximate run measured on
-- held-out exact rows, with bootstrap 95% intervals.
ALTER TABLE score_runs ADD COLUMN IF NOT EXISTS estimator VARCHAR;   -- exact | strata | mimps | paper
ALTER TABLE score_runs ADD COLUMN IF NOT EXISTS reason VARCHAR;      -- why `auto` chose it
ALTER TABLE score_runs ADD COLUMN IF NOT EXISTS precision VARCHAR;   -- score precision of exact work
ALTER TABLE score_checks ADD COLUMN IF NOT EXISTS spearman_lo DOUBLE;
ALTER TABLE score_checks ADD COLUMN IF NOT EXISTS spearman_hi DOUBLE;
ALTER TABLE score_checks ADD COLUMN IF NOT EXISTS top25_overlap_lo DOUBLE;
ALTER TABLE score_checks ADD COLUMN IF NOT EXISTS top25_overlap_hi DOUBLE;
ALTER TABLE score_checks ADD COLUMN IF NOT EXISTS mae_lo DOUBLE;
ALTER TABLE score_checks ADD COLUMN IF NOT EXISTS mae_hi DOUBLE;

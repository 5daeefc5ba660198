-- The rows of the pool `select` ranks: samples with a scores row (_select_base, queries.selection).
SELECT count(*) AS n
FROM _select_base

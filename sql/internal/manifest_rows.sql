-- The manifest (one row per index; indexer.pool checks that there is exactly one).
SELECT *
FROM manifest

-- What opening an index checks the samples rows by (indexer.pool): rows, distinct vec_ids and their
-- range, against the manifest's n (vec_id 0 to n - 1, once each).
SELECT count(*) AS rows, count(DISTINCT vec_id) AS distinct_ids, min(vec_id) AS lo, max(vec_id) AS hi
FROM samples

-- Every per-modality statistic, its shape and its values flattened row-major (indexer.pool).
SELECT modality, name, shape, value
FROM modality_stats

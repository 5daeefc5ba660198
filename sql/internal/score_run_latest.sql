-- The newest score run, every column (indexer.info: `cli.py info` shows it with its checks).
SELECT *
FROM score_runs
ORDER BY created_at DESC
LIMIT 1

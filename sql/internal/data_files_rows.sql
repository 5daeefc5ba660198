-- The build's records of its data files (sizes, headers, checksums; indexer/integrity.py).
SELECT *
FROM data_files

-- The rows of one table (indexer.store: Store.table_counts; {{table}} is one of the catalog's own
-- table names).
SELECT count(*) AS n
FROM {{table}}

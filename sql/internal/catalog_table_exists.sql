-- Whether the catalog has a table or view named $t (indexer.store: Store.has_table).
SELECT count(*) AS n
FROM information_schema.tables
WHERE table_name = $t

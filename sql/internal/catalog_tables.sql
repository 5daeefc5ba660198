-- The catalog's tables and views, by name (indexer.store: Store.tables, index_info's row counts).
SELECT table_name
FROM information_schema.tables
ORDER BY table_name

-- The newest migration applied to the catalog (indexer.store: Store.schema_version).
SELECT max(version) AS version
FROM schema_version

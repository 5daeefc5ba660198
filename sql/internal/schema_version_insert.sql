-- Record that migration $v was applied (indexer.store: Store.migrate).
INSERT INTO schema_version VALUES ($v)

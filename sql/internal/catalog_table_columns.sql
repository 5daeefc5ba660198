-- Name and type of every column of the table $t in the main schema, in order (indexer.store:
-- Store.columns; the numeric columns of scores are the allowlist of score-column identifiers).
SELECT column_name, data_type
FROM information_schema.columns
WHERE table_name = $t AND table_schema = 'main'
ORDER BY ordinal_position

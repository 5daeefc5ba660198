-- The column names of one catalog table, in their order (queries.score_store: which score columns
-- an older `scores` table holds). Parameter: $table.
SELECT column_name
FROM information_schema.columns
WHERE table_name = $table
ORDER BY ordinal_position

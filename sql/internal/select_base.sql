-- The rows `select` ranks (queries.selection): samples joined with scores on their shared keys
-- ({{keys}}: vec_id, and uid when scores has it), registered as _select_base for the select_base_*
-- and keep_rows statements.
SELECT *
FROM samples
JOIN scores USING ({{keys}})

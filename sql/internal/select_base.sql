-- The rows `select` ranks (queries.selection): samples joined with scores on their shared keys
-- ({{keys}}: vec_id, and uid when scores has it). Registered as _select_base for the statements below.
SELECT *
FROM samples
JOIN scores USING ({{keys}})

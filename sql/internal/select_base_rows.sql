-- Every row of _select_base (queries.selection), for `select --where` to filter: the condition is
-- applied by DuckDB's expression parser to this statement's relation, never pasted into SQL text.
SELECT *
FROM _select_base

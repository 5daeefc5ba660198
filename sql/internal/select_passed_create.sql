-- The rows that passed `select --where`, evaluated ONCE (queries.selection): every count and the
-- ranking read this table, so a condition such as random() < 0.5 gives consistent numbers. The
-- source relation _select_source is samples JOIN scores filtered by --where; {{score}} is the ranked
-- score column (from the allowlist of the numeric columns of scores). A TEMP table: the catalog
-- stays read-only.
CREATE OR REPLACE TEMP TABLE _select_passed AS
SELECT uid, vec_id, {{score}} AS score
FROM _select_source

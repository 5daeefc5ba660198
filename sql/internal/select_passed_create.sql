-- The rows that passed `select --where`, evaluated ONCE (queries.select): every count and the
-- ranking read this table, so a condition such as random() < 0.5 gives consistent numbers. The
-- source relation _select_source is samples JOIN scores, filtered by --where and projected to
-- uid, vec_id and the ranked score column as `score`. A TEMP table: the catalog stays read-only.
CREATE OR REPLACE TEMP TABLE _select_passed AS SELECT * FROM _select_source

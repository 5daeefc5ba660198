-- scores__new: the new `scores` table, built aside before the swap (Store.replace_scores).
-- The columns placeholder is filled with one expression per SPEC 11 score column, identifiers only from the
-- allowlist queries.score_params.SCORE_COLUMNS: `c.<col>` (computed by this run, from the registered
-- Arrow table _new_scores), `o.<col>` (carried over from the old `scores`) or
-- `CAST(NULL AS DOUBLE) AS <col>` (never computed: every public column always exists).
-- The carry placeholder is empty, or the LEFT JOIN of the old table (`o`) when some column is carried over.
CREATE TABLE scores__new AS
SELECT s.uid, s.vec_id, {columns}
FROM samples AS s
JOIN _new_scores AS c ON c.vec_id = s.vec_id
{carry}
ORDER BY s.vec_id

-- The rows of the new `scores` table with vec_id in [$lo, $hi): the query that scores_new_create.sql and
-- scores_new_append.sql fill in (Store.replace_scores).
-- The columns placeholder is filled with one expression per SPEC 11 score column, identifiers only from the
-- allowlist queries.score_params.SCORE_COLUMNS: `c.<col>` (computed by this run, from the registered
-- Arrow table _new_scores: the run's rows lo..hi - 1), `o.<col>` (carried over from the old `scores`) or
-- `CAST(NULL AS DOUBLE) AS <col>` (never computed: every public column always exists).
-- The carry placeholder is empty, or the LEFT JOIN of the old table's same rows (`o`) when some column is
-- carried over.
SELECT s.uid, s.vec_id, {columns}
FROM samples AS s
JOIN _new_scores AS c ON c.vec_id = s.vec_id
{carry}
WHERE s.vec_id >= $lo AND s.vec_id < $hi
ORDER BY s.vec_id

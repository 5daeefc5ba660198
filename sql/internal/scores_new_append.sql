-- One range of rows of scores__new, vec_id in [$lo, $hi), from scores_new_rows.sql (filled in at the rows
-- placeholder); the ranges come in vec_id order (Store.replace_scores).
INSERT INTO scores__new
{rows}

-- scores__new: the new `scores` table, built aside before the swap (Store.replace_scores). Created empty, with
-- the columns of scores_new_rows.sql (filled in at the rows placeholder); its rows are appended in ranges
-- by scores_new_append.sql.
CREATE TABLE scores__new AS
{rows}
LIMIT 0

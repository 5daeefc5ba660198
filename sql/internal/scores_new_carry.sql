-- The join scores_new_rows.sql adds when some score columns are carried over from the old table: its rows of
-- the same range only.
LEFT JOIN (SELECT * FROM scores WHERE vec_id >= $lo AND vec_id < $hi) AS o ON o.vec_id = s.vec_id

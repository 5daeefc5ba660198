-- The join scores_new_create.sql adds when some score columns are carried over from the old table.
LEFT JOIN scores AS o ON o.vec_id = s.vec_id

-- The old scores table, dropped inside the swap's transaction (Store.replace_scores).
DROP TABLE IF EXISTS scores

-- A scores__new left by a run killed before its transaction ended (Store.replace_scores).
DROP TABLE IF EXISTS scores__new

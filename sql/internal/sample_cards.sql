-- sample_cards: each sample's "card" with one score column: vec_id, uid, caption (with url and
-- image_path when samples has them) and the score, for the named queries that list samples
-- (top_by_score, bottom_by_score, caption_search: their `-- uses: sample_cards` header makes
-- queries.sqlrun create it on the connection first). They rank and filter its rows themselves.
--   score: a column of scores, unqualified (the query fills it from its `column` parameter);
--          the samples side brings only its card columns, so a samples column of the same
--          name cannot make the reference ambiguous.
CREATE OR REPLACE TEMP MACRO sample_cards(score) AS TABLE
SELECT cards.*, score
FROM scores
JOIN (SELECT vec_id, uid, COLUMNS('^(caption|url|image_path)$') FROM samples) AS cards USING (vec_id)

-- name: top_by_score
-- description: The samples with the HIGHEST value of a score column: rank, vec_id, uid, caption (with url and image_path when samples has them) and the score (ties broken by uid).
-- param: column (column, default kl_text): the score column to rank by (any numeric column of scores)
-- param: limit (int>=0, default 20): how many samples
-- uses: sample_cards
SELECT row_number() OVER (ORDER BY {{column}} DESC, uid) AS rank, *
FROM sample_cards({{column}})
WHERE {{column}} IS NOT NULL AND NOT isnan({{column}}::DOUBLE)
ORDER BY rank
LIMIT $limit

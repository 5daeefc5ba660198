-- name: caption_search
-- description: Samples whose caption contains a text (case-insensitive, plain substring: no wildcards), highest score first.
-- param: text (text): the text to look for in captions, e.g. "dog"
-- param: column (column, default kl_text): the score column to rank by
-- param: limit (int>=0, default 20): how many samples
-- uses: sample_cards
SELECT row_number() OVER (ORDER BY {{column}} DESC NULLS LAST, uid) AS rank, *
FROM sample_cards({{column}})
WHERE contains(lower(caption), lower($text))
ORDER BY rank
LIMIT $limit

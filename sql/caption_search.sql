-- name: caption_search
-- description: Samples whose caption contains a text (case-insensitive, plain substring: no wildcards), highest score first.
-- param: text (text): the text to look for in captions, e.g. "dog"
-- param: column (column, default kl_text): the score column to rank by
-- param: limit (int>=0, default 20): how many samples
SELECT
    row_number() OVER (ORDER BY sc.{{column}} DESC NULLS LAST, sm.uid) AS rank,
    sm.vec_id,
    sm.uid,
    COLUMNS('^(caption|url|image_path)$'),  -- the caption, and the url / image_path where the pool has them
    sc.{{column}}
FROM scores AS sc
JOIN samples AS sm USING (vec_id)
WHERE contains(lower(sm.caption), lower($text))
ORDER BY rank
LIMIT $limit

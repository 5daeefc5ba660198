-- name: gallery_page
-- description: One page of the explorer's gallery: vec_id and score of samples ranked by a score column, highest first (lowest = 1: lowest first; seed given: a seeded random order), optionally within lo <= score < hi (a decile). Ties broken by vec_id.
-- param: column (column, default kl_text): the score column to rank by
-- param: lowest (int>=0, default 0): 1 ranks the lowest scores first
-- param: lo (float, default NULL): keep scores >= lo
-- param: hi (float, default NULL): keep scores < hi
-- param: seed (int>=0, default NULL): a random order (hash of the uid and the seed) instead of the ranking
-- param: limit (int>=1, default 24): rows per page
-- param: offset (int>=0, default 0): rows skipped (page x limit)
SELECT vec_id, {{column}}::DOUBLE AS score
FROM scores
WHERE {{column}} IS NOT NULL AND NOT isnan({{column}}::DOUBLE)
  AND ($lo IS NULL OR {{column}} >= $lo)
  AND ($hi IS NULL OR {{column}} < $hi)
ORDER BY
    CASE WHEN $seed IS NOT NULL THEN hash(vec_id, $seed) END,
    CASE WHEN $lowest = 1 THEN {{column}} END ASC,
    CASE WHEN $lowest = 1 THEN NULL ELSE {{column}} END DESC,
    vec_id
LIMIT $limit
OFFSET $offset

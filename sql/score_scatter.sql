-- name: score_scatter
-- description: A deterministic sample of (x, y) pairs of two score columns, spread over the pool by a hash of vec_id (both values finite), for a scatter plot.
-- param: x (column, default kl_text): the column on the x axis
-- param: y (column, default clipscore): the column on the y axis
-- param: points (int>=1, default 2000): how many points
SELECT vec_id, {{x}}::DOUBLE AS x, {{y}}::DOUBLE AS y
FROM scores
WHERE {{x}} IS NOT NULL AND {{y}} IS NOT NULL AND isfinite({{x}}::DOUBLE) AND isfinite({{y}}::DOUBLE)
ORDER BY hash(vec_id), vec_id
LIMIT $points

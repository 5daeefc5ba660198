-- name: ngram_coverage
-- description: Per decile of a score column, the share of caption word-trigram occurrences covered by the `top` most frequent trigrams of the whole pool (the paper's n-gram analysis: the top-2500 trigrams cover about 60% of the lowest-KL decile and half or less of high-KL deciles). Words = maximal runs of letters, digits and apostrophes in the lower-cased caption; captions with fewer than 3 words have no trigrams.
-- param: column (column, default kl_text): the score column whose deciles are compared
-- param: top (int>=1, default 2500): how many of the pool's most frequent trigrams count as covered
-- param: buckets (int>=1, default 10): number of equal-count buckets (10 = deciles)
WITH words AS (
    SELECT vec_id, regexp_extract_all(lower(caption), '[\pL\pN'']+') AS w
    FROM samples
),
positions AS (
    SELECT vec_id, w, unnest(generate_series(1, len(w) - 2)) AS i
    FROM words
    WHERE len(w) >= 3
),
trigrams AS (
    SELECT vec_id, w[i] || ' ' || w[i + 1] || ' ' || w[i + 2] AS g
    FROM positions
),
frequent AS (
    SELECT g FROM trigrams GROUP BY g ORDER BY count(*) DESC, g LIMIT $top
),
bucketed AS (
    SELECT vec_id, sc.{{column}}::DOUBLE AS score,
           ntile($buckets) OVER (ORDER BY sc.{{column}}, vec_id) AS bucket
    FROM scores AS sc
    WHERE sc.{{column}} IS NOT NULL AND NOT isnan(sc.{{column}}::DOUBLE)
),
per_bucket AS (
    SELECT bucket, count(*) AS n, min(score) AS min, max(score) AS max FROM bucketed GROUP BY bucket
),
covered AS (
    SELECT b.bucket, count(*) AS trigrams, count(f.g) AS covered
    FROM trigrams AS t
    JOIN bucketed AS b USING (vec_id)
    LEFT JOIN frequent AS f ON t.g = f.g
    GROUP BY b.bucket
)
SELECT p.bucket, p.n, p.min, p.max,
       coalesce(c.trigrams, 0)                      AS trigrams,
       coalesce(c.covered, 0)                       AS covered,
       c.covered / nullif(c.trigrams, 0)            AS coverage
FROM per_bucket AS p
LEFT JOIN covered AS c USING (bucket)
ORDER BY p.bucket

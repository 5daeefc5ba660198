-- Counts of `select` (queries.select) over the rows that passed --where (_select_passed): passed,
-- and candidates (a score that is neither NULL nor NaN, so it can be ranked).
SELECT
    count(*)                                                               AS passed,
    count(*) FILTER (WHERE score IS NOT NULL AND NOT isnan(score::DOUBLE)) AS candidates
FROM _select_passed

-- Rows of scores, and how many hold a value of one score column ({{column}}, from the allowlist of
-- the numeric columns of scores): a column no score run computed is all NULL (queries.identifiers,
-- the explorer's column list).
SELECT count(*) AS rows, count({{column}}) AS filled
FROM scores

-- The vec_ids that passed `select --keep ... --where` (_select_passed, queries.keep).
SELECT vec_id
FROM _select_passed

-- The first uid that two samples share (by its first vec_id), with the vec_ids of its first two samples.
SELECT uid, list(vec_id ORDER BY vec_id)[1:2] AS vec_ids
FROM samples
GROUP BY uid
HAVING count(*) > 1
ORDER BY min(vec_id)
LIMIT 1

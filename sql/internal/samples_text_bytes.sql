-- Mean bytes of a sample's uid and caption (queries.weights.sample_bytes: the strings of every
-- drawn row are held in memory, so `sample -n N` predicts its memory from them).
SELECT coalesce(avg(octet_length(encode(uid)) + coalesce(octet_length(encode(caption)), 0)), 0) AS text_bytes
FROM samples

-- weights_insert: store one prompt's weights. Input: the arrow table _weights(vec_id, cosine,
-- log_weight, weight, normalized_weight) registered by queries.weights.store_weights;
-- parameters $prompt and $logit_scale.
INSERT INTO weights BY NAME
SELECT
    $prompt::VARCHAR      AS prompt,
    s.uid,
    w.vec_id,
    $logit_scale::DOUBLE  AS logit_scale,
    w.cosine,
    w.log_weight,
    w.weight,
    w.normalized_weight
FROM _weights AS w
JOIN samples AS s USING (vec_id)
ORDER BY w.vec_id

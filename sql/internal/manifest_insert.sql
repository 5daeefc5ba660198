-- The one manifest row of a new index, matched to the manifest's columns by name (not by position).
INSERT INTO manifest BY NAME
SELECT $format_version   AS format_version,
       $source           AS source,
       $synthetic        AS synthetic,
       $model            AS model,
       $pretrained       AS pretrained,
       $dim              AS dim,
       $logit_scale      AS logit_scale,
       $logit_bias       AS logit_bias,
       $n                AS n,
       $raw_known        AS raw_known,
       $embedding_dtype  AS embedding_dtype,
       $image_index      AS image_index,
       $text_index       AS text_index,
       $index_params     AS index_params,
       $created_at       AS created_at,
       $tool_version     AS tool_version,
       $extra            AS extra

-- The build's per-modality statistics (registered Arrow table _stats: modality, name, shape, value).
INSERT INTO modality_stats BY NAME SELECT * FROM _stats

-- The build's later batches of samples (registered Arrow table _batch), matched to columns by name.
INSERT INTO samples BY NAME SELECT * FROM _batch

-- The build's records of its data files (indexer/integrity.py), from the registered Arrow table _files.
INSERT INTO data_files BY NAME SELECT * FROM _files

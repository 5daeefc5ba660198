-- Write the WAL into the catalog file, so that a finished build's catalog is one file.
CHECKPOINT

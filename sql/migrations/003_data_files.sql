-- What every data file of the index held when it was built (indexer/integrity.py): opening the
-- index checks sizes and .npy headers, `info --verify` the checksums and unit norms. Indexes built
-- before this table existed have no rows in it (they open with a note).
CREATE TABLE IF NOT EXISTS data_files (
    name     VARCHAR NOT NULL,   -- file name in the index directory, or 'modality_stats' (the table)
    bytes    BIGINT,             -- file size
    dtype    VARCHAR,            -- .npy files: stored type, e.g. '<f4'
    shape    BIGINT[],           -- .npy files: shape
    crc32    BIGINT  NOT NULL,   -- zlib.crc32 of the whole file (modality_stats: of its values)
    summary  JSON                -- cheap statistics: row norms (min, max), FAISS ntotal, ...
);

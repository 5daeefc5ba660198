"""The on-disk layout of one index directory.

::

    INDEX_DIR/
      catalog.duckdb        DuckDB: manifest, samples, modality_stats (+ scores, weights, ... later)
      image.faiss           FAISS index over the normalised image embeddings (ids = vec_id); none
                            for an exact "Flat" index: that is made from image_emb.npy on open
      text.faiss            FAISS index over the normalised text embeddings (ids = vec_id)
      image_emb.npy         normalised image embeddings, row i = vec_id i (float16 or float32)
      text_emb.npy          normalised text embeddings
      image_rawnorm.npy     ||u|| of the raw image embeddings (only when raw embeddings are known)
      text_rawnorm.npy      ||u|| of the raw text embeddings
      work/                 resumable chunks of a running or interrupted ``score``
      .build                the token of the build that wrote the directory (``indexer.swap``)
      .lock                 flock target: ``score`` vs a rebuild (``indexer.lock``)
      index.json            a mirror of a URI only: its copy of the URI's marker (``indexer.remote``)
      .lock-mirror          a mirror only: flock target of its downloads and publishes (``indexer.remote``)

Row ``i`` of every array and ``vec_id = i`` in ``samples`` describe the same (image, caption) pair;
the raw embedding is ``rawnorm[i] * emb[i]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 1
MODALITIES = ("image", "text")
CATALOG = "catalog.duckdb"
#: The factory key of an exact index; such an index has no .faiss file (it is made from *_emb.npy).
FLAT_KEY = "Flat"
#: The names of the data files a build writes into an index directory (the catalog and its
#: write-ahead log, each modality's FAISS index, embeddings and raw norms, the skipped samples), as
#: a regular expression's alternatives: what a URI holds (``indexer.remote``), and part of what a
#: rebuild may replace (``indexer.build``).
DATA_FILES = (rf"{re.escape(CATALOG)}(\.wal)?|({'|'.join(MODALITIES)})(\.faiss|_emb\.npy|_rawnorm\.npy)"
              r"|skipped\.tsv")


def check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return modality


@dataclass(frozen=True)
class IndexPaths:
    """Paths of the files inside one index directory."""

    root: Path

    @property
    def catalog(self) -> Path:
        return self.root / CATALOG

    def faiss(self, modality: str) -> Path:
        return self.root / f"{check_modality(modality)}.faiss"

    def embeddings(self, modality: str) -> Path:
        return self.root / f"{check_modality(modality)}_emb.npy"

    def rawnorms(self, modality: str) -> Path:
        return self.root / f"{check_modality(modality)}_rawnorm.npy"

    def work_dir(self, name: str) -> Path:
        """Scratch space for resumable jobs (e.g. scoring chunks), inside the index."""
        return self.root / "work" / name

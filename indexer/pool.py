"""Open a built index directory: manifest, embeddings (memory-mapped), FAISS indexes, statistics."""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import BrokenIndex, FormatVersionMismatch, IndexNotFound, IndexReplaced
from indexer.layout import FLAT_KEY, FORMAT_VERSION, MODALITIES, IndexPaths, check_modality
from queries.store import Store


#: Seconds a reader waits for another process's write (a score or weights storing its table).
READ_WAIT = 30.0


class PoolIndex:
    """A built index. Cheap to open; arrays and FAISS indexes load on first use.

    Args:
        path: the index directory.
        mmap: memory-map the FAISS indexes read-only instead of reading them into memory.
    """

    def __init__(self, path: str | Path, mmap: bool = False):
        self.root = Path(path)
        self.paths = IndexPaths(self.root)
        self.mmap = mmap
        if not self.root.is_dir():
            raise IndexNotFound(f"Index directory {str(self.root)!r} does not exist")
        if not self.paths.catalog.is_file():
            raise IndexNotFound(
                f"{str(self.root)!r} is not an index: it has no {self.paths.catalog.name} "
                "(build one with `cli.py build-index --out DIR`)"
            )
        self._identity = self._dir_identity()
        self.manifest = self._read_manifest()
        fv = self.manifest.get("format_version")
        if fv != FORMAT_VERSION:
            raise FormatVersionMismatch(
                f"Index {str(self.root)!r} has format version {fv}; this tool reads version "
                f"{FORMAT_VERSION}. Rebuild it with `cli.py build-index`."
            )
        self._check_files()
        self._faiss: dict[str, Any] = {}
        self._emb: dict[str, np.ndarray] = {}
        self._reader: Store | None = None

    def _dir_identity(self) -> tuple | None:
        """What tells one build of the directory from the next: the directory's inode and the inode
        and write time of its image embeddings (written once per build). The directory's inode
        alone is not enough: ext4 hands a new build the inode of one two builds earlier."""
        try:
            d, e = os.stat(self.root), os.stat(self.paths.embeddings("image"))
        except OSError:
            return None
        return d.st_dev, d.st_ino, e.st_ino, e.st_mtime_ns

    def check_current(self) -> None:
        """Raise ``IndexReplaced`` when the directory was rebuilt (or removed) since this object
        opened it: its arrays, FAISS indexes and manifest describe the old index, and mixing them
        with the new catalog would return or store wrong rows. Every data access checks this."""
        if self._dir_identity() != self._identity:
            raise IndexReplaced(f"Index {str(self.root)!r} was rebuilt or removed after it was opened; "
                                "open it again (queries.open_index) to use the new one")

    def _check_files(self) -> None:
        """Every file the manifest implies is there (a damaged or half-copied index fails here)."""
        params = self.manifest.get("index_params") or {}
        missing = []
        for m in MODALITIES:
            need = [self.paths.embeddings(m)]
            if (params.get(m) or {}).get("key") != FLAT_KEY:
                need.append(self.paths.faiss(m))
            if self.manifest.get("raw_known"):
                need.append(self.paths.rawnorms(m))
            missing += [p.name for p in need if not p.is_file()]
        if missing:
            raise BrokenIndex(f"Index {str(self.root)!r} is incomplete: {', '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} missing; rebuild it with "
                              "`cli.py build-index`")

    def _read_manifest(self) -> dict:
        with self.store(read_only=True) as s:
            if not s.has_table("manifest"):
                raise IndexNotFound(f"Catalog {str(self.paths.catalog)!r} has no manifest table")
            rows = list(s.query("SELECT * FROM manifest"))
        if len(rows) != 1:
            raise IndexNotFound(f"Catalog {str(self.paths.catalog)!r} has {len(rows)} manifest rows")
        m = rows[0]
        for key in ("index_params", "extra"):
            if isinstance(m.get(key), str):
                m[key] = json.loads(m[key])
        return m

    # -- manifest shortcuts ---------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.manifest["n"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def logit_scale(self) -> float:
        return float(self.manifest["logit_scale"])

    @property
    def logit_bias(self) -> float | None:
        b = self.manifest.get("logit_bias")
        return None if b is None else float(b)

    @property
    def synthetic(self) -> bool:
        return bool(self.manifest["synthetic"])

    @property
    def raw_known(self) -> bool:
        return bool(self.manifest["raw_known"])

    # -- data -----------------------------------------------------------------------------
    def store(self, read_only: bool = True, wait: float | None = None) -> Store:
        """A new ``Store`` over the catalog (a context manager that closes it).

        A writable one first closes this object's kept reader (see ``reader``): DuckDB opens a file
        with one configuration per process. ``wait``: seconds to retry while another process holds
        the catalog (``Store``); default ``READ_WAIT`` for a reader (a writer's commit is short),
        0 for a writer.
        """
        self.check_current()
        if not read_only:
            self.close()
        if wait is None:
            wait = READ_WAIT if read_only else 0.0
        return Store(self.paths.catalog, read_only=read_only, must_exist=True, wait=wait)

    def reader(self) -> Store:
        """A read-only ``Store`` kept open until ``close()`` (do not close it yourself).

        For repeated low-latency reads (``sample --mode top``): opening the catalog costs ~20-30 ms
        at 1M samples. While it is open, other processes cannot open the catalog for writing
        (DuckDB's file lock); ``close()`` or leaving a ``with open_index(...)`` block releases it.
        """
        self.check_current()
        if self._reader is None:
            self._reader = Store(self.paths.catalog, read_only=True, must_exist=True, wait=READ_WAIT)
        return self._reader

    def close(self) -> None:
        """Close the kept reader, if any (the index stays usable: it reopens on demand)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> "PoolIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def embeddings(self, modality: str) -> np.ndarray:
        """Normalised embeddings of one modality, shape (n, dim), memory-mapped read-only."""
        check_modality(modality)
        self.check_current()
        if modality not in self._emb:
            path = self.paths.embeddings(modality)
            try:
                emb = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:  # truncated or overwritten: mmap length, bad header
                raise BrokenIndex(f"Index {str(self.root)!r}: cannot read {path.name} ({e}); rebuild the "
                                  "index with `cli.py build-index`") from None
            if emb.ndim != 2 or emb.shape != (self.n, self.dim):
                raise BrokenIndex(f"Index {str(self.root)!r}: {path.name} has shape {emb.shape}, the "
                                  f"manifest says ({self.n}, {self.dim}); rebuild the index")
            self._emb[modality] = emb
        return self._emb[modality]

    def raw_norms(self, modality: str) -> np.ndarray | None:
        """||u|| of the raw embeddings, or None when the source gave normalised vectors only."""
        self.check_current()
        p = self.paths.rawnorms(modality)
        return np.load(p) if p.is_file() else None

    def faiss(self, modality: str):
        """The FAISS index of one modality (ids = vec_id), loaded on first use.

        An exact (``Flat``) index has no file: it is made from the stored embeddings.
        """
        check_modality(modality)
        self.check_current()
        if modality not in self._faiss:
            from indexer import faiss_index

            path = self.paths.faiss(modality)
            params = (self.manifest.get("index_params") or {}).get(modality) or {}
            if not path.exists() and params.get("key") == faiss_index.FLAT_KEY:
                self._faiss[modality] = faiss_index.flat_index(self.embeddings(modality))
            else:
                try:
                    self._faiss[modality] = faiss_index.load_index(path, mmap=self.mmap)
                except RuntimeError as e:  # FAISS's own message for a truncated or foreign file
                    first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    raise BrokenIndex(f"Index {str(self.root)!r}: cannot read {path.name} ({first}); "
                                      "rebuild the index with `cli.py build-index`") from None
        return self._faiss[modality]

    @cached_property
    def _stats(self) -> dict[tuple[str, str], np.ndarray]:
        out = {}
        with self.store(read_only=True) as s:
            for row in s.query("SELECT modality, name, shape, value FROM modality_stats"):
                out[(row["modality"], row["name"])] = np.asarray(row["value"], dtype=np.float64).reshape(
                    tuple(row["shape"])
                )
        return out

    def stat(self, modality: str, name: str) -> np.ndarray:
        """A per-modality statistic (see ``sql/migrations/001_create_tables.sql`` for names)."""
        check_modality(modality)
        self.check_current()
        try:
            return self._stats[(modality, name)]
        except KeyError:
            raise KeyError(f"Index {str(self.root)!r} has no statistic {name!r} for {modality}") from None


def open_index(path: str | Path, mmap: bool = False) -> PoolIndex:
    """Open the index at ``path``; raises ``IndexNotFound`` or ``FormatVersionMismatch``."""
    return PoolIndex(path, mmap=mmap)


def as_pool(index: "str | Path | PoolIndex") -> PoolIndex:
    """``index`` itself if it is an opened ``PoolIndex``, else ``open_index(index)``."""
    return index if isinstance(index, PoolIndex) else open_index(index)

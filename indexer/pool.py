"""Open a built index (a directory, or a URI through its local mirror): manifest, embeddings
(memory-mapped), FAISS indexes, statistics."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from functools import cached_property
from pathlib import Path
from typing import Any, ContextManager, Iterator

import numpy as np

from clip_density_index.indexer import integrity, remote
from clip_density_index.indexer.errors import (BrokenIndex, FormatVersionMismatch, IndexNotFound, IndexReplaced,
                            MissingStatistic)
from clip_density_index.indexer.fs import input_path
from clip_density_index.indexer.layout import FLAT_KEY, FORMAT_VERSION, MODALITIES, IndexPaths, check_modality
from clip_density_index.indexer.swap import recover
from clip_density_index.indexer.store import Store, first_line

log = logging.getLogger(__name__)


#: Seconds a reader waits for another process's write (a score or weights storing its table).
READ_WAIT = 30.0
#: Tables every index has from its build.
REQUIRED_TABLES = ("manifest", "samples", "modality_stats")
#: Manifest columns that must hold a value, and the Python types they may have.
_MANIFEST_TYPES = {
    "format_version": (int,), "source": (str,), "synthetic": (bool,), "dim": (int,),
    "logit_scale": (int, float), "n": (int,), "raw_known": (bool,), "embedding_dtype": (str,),
    "image_index": (str,), "text_index": (str,),
}
_NOTED: set[str] = set()  # indexes this process has printed the "no checksums" note for


def _manifest_value(key: str, kind: type) -> property:
    """A read-only ``PoolIndex`` attribute: the manifest's value ``key`` as ``kind``."""
    return property(lambda self: kind(self.manifest[key]), doc=f"The manifest's ``{key}`` as {kind.__name__}.")


class PoolIndex:
    """A built index. Cheap to open; arrays and FAISS indexes load on first use.

    Args:
        path: the index directory.
        mmap: memory-map the FAISS indexes read-only instead of reading them into memory.
        uri: the URI the index was published to, when ``path`` is its local mirror
            (``indexer.remote``; ``open_index`` sets it): writes to the catalog are published there.
    """

    def __init__(self, path: str | Path, mmap: bool = False, uri: str | None = None):
        self.root = Path(path)
        #: The URI of an index opened from its mirror (``root``), else None.
        self.uri = uri
        self.paths = IndexPaths(self.root)
        self.mmap = mmap
        #: What opening the index noticed (an index put back after a killed build, no checksums).
        self.notes: list[str] = []
        restored = recover(self.root)  # a build killed between its two renames moved it aside
        if restored:
            self.notes.append(restored)
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
        self._check_manifest()
        self._check_files()
        integrity.check_cheap(self.root, self.file_records, self.n, self.dim, self.manifest["embedding_dtype"])
        if not self.file_records:
            note = f"Index {str(self.root)!r} {integrity.NO_RECORD}"
            self.notes.append(note)
            if str(self.root.resolve()) not in _NOTED:
                _NOTED.add(str(self.root.resolve()))
                log.warning(note)
        self._faiss: dict[str, Any] = {}
        self._emb: dict[str, np.ndarray] = {}
        self._unit_checked: set[str] = set()
        self._raw: dict[str, np.ndarray] = {}
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
        """The manifest row; also reads the sample count and the ``data_files`` records (one
        connection). A damaged catalog, a missing table or sample rows: ``BrokenIndex``."""
        cat = str(self.paths.catalog)
        with self.store(read_only=True) as s, s.errors(f"Reading the catalog {cat!r}", BrokenIndex,
                                                      "; rebuild the index", whole=False):
            tables = set(s.tables())  # a damaged block, a dropped column: BrokenIndex
            if "manifest" not in tables:
                raise IndexNotFound(f"Catalog {cat!r} has no manifest table")
            missing = [t for t in REQUIRED_TABLES if t not in tables]
            if missing:
                raise BrokenIndex(f"Catalog {cat!r} has no {', '.join(missing)} table"
                                  f"{'s' if len(missing) > 1 else ''}: it is damaged; rebuild the index")
            rows = s.rows("manifest_rows")
            counts = s.rows("samples_vec_id_counts")[0]
            records = s.rows("data_files_rows") if "data_files" in tables else []
        if len(rows) != 1:
            raise IndexNotFound(f"Catalog {cat!r} has {len(rows)} manifest rows")
        m = rows[0]
        for key in ("index_params", "extra"):
            if isinstance(m.get(key), str):
                try:
                    m[key] = json.loads(m[key])
                except ValueError:
                    raise BrokenIndex(f"Catalog {cat!r}: manifest value {key} is not valid JSON ({m[key][:60]!r}); "
                                      "rebuild the index") from None
        self._sample_counts = counts["rows"], counts["distinct_ids"], counts["lo"], counts["hi"]
        self.file_records = integrity.load_records(records)
        return m

    def _check_manifest(self) -> None:
        """Types and ranges of the manifest's values, and the ``samples`` rows against ``n``."""
        cat, m = str(self.paths.catalog), self.manifest

        def bad(key, why):
            raise BrokenIndex(f"Catalog {cat!r}: manifest value {key} = {str(m.get(key))[:60]!r} {why}; the "
                              "catalog is damaged, rebuild the index")

        for key, types in _MANIFEST_TYPES.items():
            v = m.get(key)
            if v is None or not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
                bad(key, f"is not a {types[0].__name__}")
        if m["n"] < 2 or m["dim"] < 1:
            bad("n" if m["n"] < 2 else "dim", "is out of range")
        if not (math.isfinite(m["logit_scale"]) and m["logit_scale"] > 0):
            bad("logit_scale", "is not a positive number")
        if m["embedding_dtype"] not in ("float16", "float32"):
            bad("embedding_dtype", "is not float16 or float32")
        params = m.get("index_params")
        if params is not None and not (isinstance(params, dict) and all(
                isinstance(params.get(mod), dict) and isinstance(params[mod].get("key", ""), str)
                for mod in MODALITIES if mod in params)):
            bad("index_params", "is not an object of per-modality objects")
        if m.get("extra") is not None and not isinstance(m["extra"], dict):
            bad("extra", "is not an object")
        rows, distinct, lo, hi = self._sample_counts
        if not (rows == distinct == m["n"] and lo == 0 and hi == m["n"] - 1):
            raise BrokenIndex(f"Catalog {cat!r}: table samples has {rows:,} rows ({distinct:,} distinct vec_ids "
                              f"from {lo} to {hi}); the manifest says n = {m['n']:,} (vec_id 0 to {m['n'] - 1}): "
                              "rows are missing or damaged; rebuild the index")

    # -- manifest shortcuts (read-only) ----------------------------------------------------
    n = _manifest_value("n", int)
    dim = _manifest_value("dim", int)
    logit_scale = _manifest_value("logit_scale", float)
    synthetic = _manifest_value("synthetic", bool)
    raw_known = _manifest_value("raw_known", bool)

    @property
    def logit_bias(self) -> float | None:
        """The manifest's ``logit_bias`` (SigLIP's b) as a float, or None (CLIP)."""
        b = self.manifest.get("logit_bias")
        return None if b is None else float(b)

    @property
    def created_at(self) -> str:
        """The manifest's ``created_at`` as text: with ``root``, what names this build to an engine's
        tasks (``task_index``)."""
        return str(self.manifest.get("created_at"))

    @property
    def location(self) -> str:
        """What names this index to an engine's tasks, with ``created_at`` (``task_index``): its URI,
        which each worker mirrors on its own node, or its directory's absolute path (a path every
        node reads)."""
        return self.uri or str(self.root.resolve())

    # -- data -----------------------------------------------------------------------------
    def store(self, read_only: bool = True, wait: float | None = None) -> "Store | ContextManager[Store]":
        """A new ``Store`` over the catalog (a context manager that closes it).

        A writable one first closes this object's kept reader (see ``reader``): DuckDB opens a file
        with one configuration per process. ``wait``: seconds to retry while another process holds
        the catalog (``Store``); default ``READ_WAIT`` for a reader (a writer's commit is short),
        0 for a writer. For an index opened from a URI, a writable store is a context manager
        that yields the ``Store`` and, when its block succeeds, publishes the changed catalog to
        the URI (``indexer.remote.publish``, which first checks that the URI still holds this
        build: ``IndexReplaced``).
        """
        self.check_current()
        if not read_only:
            self.close()
        if wait is None:
            wait = READ_WAIT if read_only else 0.0
        store = Store(self.paths.catalog, read_only=read_only, must_exist=True, wait=wait)
        return store if read_only or self.uri is None else self._publishing(store)

    @contextlib.contextmanager
    def _publishing(self, store: Store) -> Iterator[Store]:
        with store:
            yield store
        remote.publish(self.root, self.uri, expected_created_at=self.created_at)

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

    def embeddings(self, modality: str, checked: bool = True) -> np.ndarray:
        """Normalised embeddings of one modality, shape (n, dim), memory-mapped read-only.

        Args:
            checked: first check (once per object) that every row is a unit vector, in one pass
                over the file; a row that is not (NaN, 1e30: a damaged file) raises ``BrokenIndex``.
                False for callers that read a few rows only: they check those (``unit_rows``).
        """
        check_modality(modality)
        self.check_current()
        if modality not in self._emb:
            path = self.paths.embeddings(modality)
            try:
                emb = np.load(path, mmap_mode="r")
            except (OSError, ValueError, EOFError) as e:  # truncated or overwritten: mmap length, bad header;
                # EOFError: an empty file (click turned it into a bare "Aborted!")
                raise BrokenIndex(f"Index {str(self.root)!r}: cannot read {path.name} ({e}); rebuild the "
                                  "index with `cli.py build-index`") from None
            if emb.ndim != 2 or emb.shape != (self.n, self.dim):
                raise BrokenIndex(f"Index {str(self.root)!r}: {path.name} has shape {emb.shape}, the "
                                  f"manifest says ({self.n}, {self.dim}); rebuild the index")
            self._emb[modality] = emb
        if checked and modality not in self._unit_checked:
            integrity.check_unit(self._emb[modality], f"Index {str(self.root)!r}: {self.paths.embeddings(modality).name}")
            self._unit_checked.add(modality)
        return self._emb[modality]

    def unit_rows(self, modality: str, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of the embeddings in float64, each checked to be a unit vector."""
        rows = np.asarray(self.embeddings(modality, checked=False)[ids], dtype=np.float64)
        integrity.check_unit(rows, f"Index {str(self.root)!r}: {self.paths.embeddings(modality).name}",
                             offset_ids=np.asarray(ids))
        return rows

    def raw_norms(self, modality: str) -> np.ndarray | None:
        """||u|| of the raw embeddings, or None when the source gave normalised vectors only.

        Checked on first use: its checksum from the build (when recorded), n finite positive values."""
        check_modality(modality)
        self.check_current()
        p = self.paths.rawnorms(modality)
        if not p.is_file():
            return None
        if modality not in self._raw:
            integrity.check_crc(p, self.file_records)
            try:
                a = np.load(p)
            except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
                raise BrokenIndex(f"Index {str(self.root)!r}: cannot read {p.name} ({first_line(e)}); rebuild "
                                  "the index") from None
            if a.shape != (self.n,) or not bool(np.all(np.isfinite(a) & (a > 0))):
                raise BrokenIndex(f"Index {str(self.root)!r}: {p.name} is damaged (shape {a.shape}, or values "
                                  "that are not finite positive norms); rebuild the index")
            self._raw[modality] = a
        return self._raw[modality]

    def faiss(self, modality: str):
        """The FAISS index of one modality (ids = vec_id), loaded on first use.

        An exact (``Flat``) index has no file: it is made from the stored embeddings.
        """
        check_modality(modality)
        self.check_current()
        if modality not in self._faiss:
            from clip_density_index.indexer import faiss_index

            path = self.paths.faiss(modality)
            params = (self.manifest.get("index_params") or {}).get(modality) or {}
            if not path.exists() and params.get("key") == faiss_index.FLAT_KEY:
                self._faiss[modality] = faiss_index.flat_index(self.embeddings(modality))
            else:
                if not self.mmap:  # a memory map reads only what searches touch: no checksum then
                    integrity.check_crc(path, self.file_records)
                try:
                    index = faiss_index.load_index(path, mmap=self.mmap)
                except RuntimeError as e:  # FAISS's own message for a truncated or foreign file
                    first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    raise BrokenIndex(f"Index {str(self.root)!r}: cannot read {path.name} ({first}); "
                                      "rebuild the index with `cli.py build-index`") from None
                if index.ntotal != self.n or index.d != self.dim:
                    raise BrokenIndex(f"Index {str(self.root)!r}: {path.name} holds {index.ntotal:,} vectors of "
                                      f"dimension {index.d}; the manifest says {self.n:,} of {self.dim}: rebuild "
                                      "the index")
                self._faiss[modality] = index
        return self._faiss[modality]

    @cached_property
    def _stats(self) -> dict[tuple[str, str], np.ndarray]:
        cat = str(self.paths.catalog)
        out = {}
        with self.store(read_only=True) as s, s.errors(f"Reading modality_stats of the catalog {cat!r}",
                                                      BrokenIndex, "; rebuild the index", whole=False):
            rows = s.rows("modality_stats_rows")
        for row in rows:
            try:
                out[(row["modality"], row["name"])] = np.asarray(row["value"], dtype=np.float64).reshape(
                    tuple(row["shape"])
                )
            except (TypeError, ValueError):
                raise BrokenIndex(f"Catalog {cat!r}: statistic {row['name']!r} of {row['modality']} is damaged "
                                  f"(shape {row['shape']}); rebuild the index") from None
        rec = self.file_records.get("modality_stats")
        if rec is not None:
            want = (rec.get("summary") or {}).get("rows")
            if want is not None and len(out) != want:
                raise BrokenIndex(f"Catalog {cat!r}: modality_stats has {len(out)} statistics, the build wrote "
                                  f"{want}: some are missing; rebuild the index")
            if integrity.stats_crc(out) != rec["crc32"]:
                raise BrokenIndex(f"Catalog {cat!r}: the values in modality_stats differ from the build's "
                                  "(checksum): the catalog is damaged; rebuild the index")
        return out

    def stat(self, modality: str, name: str) -> np.ndarray:
        """A per-modality statistic (see ``sql/migrations/001_create_tables.sql`` for names)."""
        check_modality(modality)
        self.check_current()
        try:
            return self._stats[(modality, name)]
        except KeyError:
            raise MissingStatistic(f"Catalog {str(self.paths.catalog)!r} has no statistic {name!r} for {modality}: "
                                   "the index is damaged or was built by an older version; rebuild it") from None


def open_index(path: str | Path, mmap: bool = False, cache_dir: str | Path | None = None) -> PoolIndex:
    """Open the index at ``path``: a directory, or the URI of an index published to an object store
    (``s3://bucket/idx``), opened from its local mirror in ``cache_dir`` (default
    ``indexer.remote.cache_root()``), which is brought up to date first (``indexer.remote.mirror``).

    Raises:
        IndexNotFound: no index at ``path``.
        FormatVersionMismatch: an index of another format version.
        InvalidParameter: a URI whose protocol's fsspec package is missing.
    """
    uri = remote.index_uri(path)
    if uri is None:
        return PoolIndex(input_path(path), mmap=mmap)
    return PoolIndex(remote.mirror(uri, cache_dir), mmap=mmap, uri=uri)


def as_pool(index: "str | Path | PoolIndex") -> PoolIndex:
    """``index`` itself if it is an opened ``PoolIndex``, else ``open_index(index)`` (a directory or a URI)."""
    return index if isinstance(index, PoolIndex) else open_index(index)


#: Indexes this worker process has open for engine tasks, by location: a worker runs many tasks of
#: a run and opens the index (manifest, memory maps, FAISS) once.
_TASK_INDEXES: dict[str, PoolIndex] = {}


def task_index(location: str, created_at: str) -> PoolIndex:
    """The index this worker process has open at ``location`` (``PoolIndex.location``: a directory,
    or a URI mirrored on this node), created at ``created_at`` (the build the run's driver opened):
    opened by the process's first task there and kept for the next ones, opened again when the
    location holds another build.

    Raises:
        IndexReplaced: the index at ``location`` is not the build created at ``created_at`` (it was
            rebuilt after the run opened it), or was rebuilt since this process opened it.
    """
    pool = _TASK_INDEXES.get(location)
    if pool is None or pool.created_at != created_at:
        pool = _TASK_INDEXES[location] = open_index(location)
    pool.check_current()
    if pool.created_at != created_at:
        raise IndexReplaced(f"Index {location!r} was rebuilt after this run opened it; run the command again")
    return pool

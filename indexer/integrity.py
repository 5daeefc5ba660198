"""What the data files of an index held when it was built, and checks that they still do.

At build time ``record`` stores, per file (``*_emb.npy``, ``*_rawnorm.npy``, ``*.faiss``) and for
the ``modality_stats`` table, its size, ``.npy`` header (type, shape), a CRC-32 of the whole file
and cheap statistics (row norms) in the catalog's ``data_files`` table.

Three levels of checking, by cost:

- on open (``check_cheap``): sizes and ``.npy`` headers, O(1) per file;
- on first use of an array or index (``PoolIndex``): the unit norm of every embedding row (a value
  that cannot come from a unit vector, NaN, 1e30, is refused, not scored), the CRC of the FAISS
  files, of the raw norms and of the statistics;
- ``info --verify`` (``verify``): everything, including the CRC of the embedding files.

Indexes built before ``data_files`` existed have no records: they open with a note (``NO_RECORD``).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from clip_density_index.indexer.errors import BrokenIndex
from clip_density_index.indexer.layout import MODALITIES, IndexPaths

#: An embedding row whose norm is further than this from 1 cannot be a stored unit vector (float16
#: storage is off by about 1e-3 at most).
NORM_TOLERANCE = 1e-2
NO_RECORD = ("was built before data files were recorded (no checksums): only shapes are checked; "
             "rebuild it to have its files verified")
_CHUNK = 16 << 20


def crc32_file(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)


def npy_header(path: Path) -> tuple[str, tuple[int, ...], int]:
    """(dtype descr, shape, data offset) of an ``.npy`` file, from its header only."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = f.tell()
    except (OSError, ValueError, SyntaxError) as e:
        raise BrokenIndex(f"{str(path)!r} is not a readable .npy file ({_first(e)}); rebuild the index "
                          "with `cli.py build-index`") from None
    if fortran:
        raise BrokenIndex(f"{str(path)!r}: unexpected Fortran-ordered .npy; rebuild the index")
    return np.lib.format.dtype_to_descr(dtype), tuple(int(s) for s in shape), offset


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def stats_crc(stats: dict[tuple[str, str], np.ndarray]) -> int:
    """CRC-32 of the statistics' names, shapes and float64 values, in sorted order."""
    crc = 0
    for (m, name) in sorted(stats):
        v = np.ascontiguousarray(stats[(m, name)], dtype=np.float64)
        crc = zlib.crc32(f"{m}/{name}".encode(), crc)
        crc = zlib.crc32(np.asarray(v.shape, dtype=np.int64).tobytes(), crc)
        crc = zlib.crc32(v.tobytes(), crc)
    return crc


def row_norms(emb: np.ndarray, chunk: int = 16384) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, norms) of ``emb`` block by block, in float32 (float64 for tiny blocks)."""
    from clip_density_index.indexer.arrays import copy_cast

    scratch = np.empty((min(chunk, emb.shape[0]),) + emb.shape[1:], np.float32)
    for i in range(0, emb.shape[0], chunk):
        src = emb[i : i + chunk]
        block = copy_cast(scratch[: src.shape[0]], src)  # float16 through torch: ~10x numpy's speed
        with np.errstate(over="ignore", invalid="ignore"):
            yield i, np.sqrt(np.einsum("ij,ij->i", block, block))


def check_unit(emb: np.ndarray, name: str, offset_ids: np.ndarray | None = None) -> None:
    """Raise ``BrokenIndex`` naming ``name`` and the row when a row of ``emb`` is not a unit vector.

    Args:
        offset_ids: the vec_ids of ``emb``'s rows (when it holds selected rows), for the message.
    """
    for first, norms in row_norms(emb):
        bad = ~(np.abs(norms - 1.0) <= NORM_TOLERANCE)  # NaN compares false: bad
        if bad.any():
            r = first + int(np.flatnonzero(bad)[0])
            row = int(offset_ids[r]) if offset_ids is not None else r
            count = int(bad.sum())
            raise BrokenIndex(f"{name}: row {row} has norm {norms[r - first]:.6g}, not 1: the file is damaged "
                              f"({count} such row{'s' if count != 1 else ''} in this block); rebuild the index "
                              "with `cli.py build-index`")


def _npy_record(path: Path, crc: int | None = None) -> dict:
    descr, shape, _ = npy_header(path)
    return {"name": path.name, "bytes": path.stat().st_size, "dtype": descr, "shape": list(shape),
            "crc32": crc32_file(path) if crc is None else crc, "summary": None}


def record(root: Path, stats: dict[tuple[str, str], np.ndarray], faiss_ntotal: dict[str, int],
           known_crc: dict[str, int | None] | None = None) -> list[dict]:
    """The ``data_files`` rows of the finished index directory ``root`` (files already written).

    Args:
        known_crc: CRC-32 of files computed as they were written (``NpyWriter.crc32``), by name:
            those are not read again (the embedding files: 2 GB at 1M x 512 float16).
    """
    paths = IndexPaths(root)
    known = known_crc or {}
    rows = []
    for m in MODALITIES:
        p = paths.embeddings(m)
        r = _npy_record(p, known.get(p.name))
        r["summary"] = {"rows": r["shape"][0]}
        rows.append(r)
        p = paths.rawnorms(m)
        if p.is_file():
            r = _npy_record(p)
            a = np.load(p)
            r["summary"] = {"min": float(a.min()), "max": float(a.max()), "sum": float(a.astype(np.float64).sum())}
            rows.append(r)
        p = paths.faiss(m)
        if p.is_file():
            rows.append({"name": p.name, "bytes": p.stat().st_size, "dtype": None, "shape": None,
                         "crc32": crc32_file(p), "summary": {"ntotal": int(faiss_ntotal.get(m, -1))}})
    rows.append({"name": "modality_stats", "bytes": None, "dtype": None, "shape": None,
                 "crc32": stats_crc(stats), "summary": {"rows": len(stats)}})
    for r in rows:
        r["summary"] = json.dumps(r["summary"]) if r["summary"] is not None else None
    return rows


def load_records(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for r in rows:
        r = dict(r)
        if isinstance(r.get("summary"), str):
            try:
                r["summary"] = json.loads(r["summary"])
            except ValueError:
                r["summary"] = None
        out[r["name"]] = r
    return out


def check_cheap(root: Path, records: dict[str, dict], n: int, dim: int, dtype: str | None) -> None:
    """Sizes and ``.npy`` headers of every recorded file, and the headers of the embedding files
    against the manifest (also for indexes without records). Raises ``BrokenIndex``."""
    paths = IndexPaths(root)
    want = {"float16": "<f2", "float32": "<f4"}.get(dtype or "", None)
    for m in MODALITIES:
        p = paths.embeddings(m)
        if p.is_file():
            descr, shape, _ = npy_header(p)
            if shape != (n, dim):
                raise BrokenIndex(f"{str(p)!r} has shape {shape} in its header; the manifest says ({n}, {dim}): the "
                                  "file is damaged or from another index; rebuild the index")
            if want is not None and descr != want:
                raise BrokenIndex(f"{str(p)!r} holds {descr} values by its header; the manifest says {dtype}: the "
                                  "file is damaged; rebuild the index")
    for name, r in records.items():
        p = root / name
        if name == "modality_stats" or not p.is_file():
            continue  # a missing file is reported by PoolIndex._check_files
        size = p.stat().st_size
        if r.get("bytes") is not None and size != r["bytes"]:
            raise BrokenIndex(f"{str(p)!r} has {size:,} bytes; it had {r['bytes']:,} when the index was built: "
                              "the file is truncated or damaged; rebuild the index")
        if r.get("dtype") is not None:
            descr, shape, _ = npy_header(p)
            if descr != r["dtype"] or list(shape) != list(r["shape"]):
                raise BrokenIndex(f"{str(p)!r} has header {descr} {shape}; it was {r['dtype']} {tuple(r['shape'])} "
                                  "when the index was built: the file is damaged; rebuild the index")


def check_crc(path: Path, records: dict[str, dict]) -> None:
    """The CRC-32 of ``path`` against its record (no record: nothing to check)."""
    r = records.get(path.name)
    if r is None:
        return
    crc = crc32_file(path)
    if crc != r["crc32"]:
        raise BrokenIndex(f"{str(path)!r} does not match its checksum from the build (crc32 {crc:08x}, recorded "
                          f"{r['crc32']:08x}): the file is damaged; rebuild the index with `cli.py build-index`")


def verify(pool) -> list[tuple[str, str, str]]:
    """Check everything: (name, "ok" | "FAILED" | "unchecked", detail) per data file of ``pool``."""
    from clip_density_index.indexer.errors import ClipIndexError

    out = []
    records = pool.file_records
    paths = pool.paths

    def run(name, fn):
        try:
            detail = fn()
            out.append((name, "ok", detail or ""))
        except ClipIndexError as e:
            out.append((name, "FAILED", str(e)))

    for m in MODALITIES:
        p = paths.embeddings(m)

        def emb_check(p=p, m=m):
            if p.name in records:
                check_crc(p, records)
            emb = np.load(p, mmap_mode="r")
            check_unit(emb, str(p))
            total = np.zeros(emb.shape[1])
            for i in range(0, emb.shape[0], 16384):
                total += np.asarray(emb[i : i + 16384], dtype=np.float64).sum(0)
            want = pool.stat(m, "sum")
            err = float(np.abs(total - want).max())
            if not err <= 1e-3 * max(1.0, np.sqrt(emb.shape[0])):
                raise BrokenIndex(f"{str(p)!r}: its column sums differ from the statistics of the build by {err:.3g}; "
                                  "the file is damaged; rebuild the index")
            return ("crc32, " if p.name in records else "no checksum recorded, ") + "unit norms, column sums"

        run(p.name, emb_check)
        p = paths.rawnorms(m)
        if p.is_file():
            def raw_check(p=p, m=m):
                check_crc(p, records)
                pool.raw_norms(m)
                return "crc32, finite and positive" if p.name in records else "finite and positive"

            run(p.name, raw_check)
        p = paths.faiss(m)
        if p.is_file():
            def faiss_check(p=p, m=m):
                pool.faiss(m)  # checks the CRC when recorded
                return "crc32, loads" if p.name in records else "loads (no checksum recorded)"

            run(p.name, faiss_check)
    run("modality_stats", lambda: (pool.stat("image", "mean"), "crc32" if "modality_stats" in records
                                   else "present (no checksum recorded)")[1])
    return out

"""The resumable work folder of a score run: chunk files written whole or not at all, and reused.

A run keeps its finished KL chunks under ``IndexPaths(root).work_dir("score-<hash>")``
(``queries.score_params.work_name``): one parquet file per chunk of queries
(``<side>-<start>.parquet``: ``vec_id``, ``kl_<side>``, ``klr_<side>``) and, for an exact run of
both sides, one running file of the images' column partials (``imagecols.parquet``) that records
which chunks it holds. A rerun with the same parameters reuses every chunk that is there and whole.
The run's score columns are files there too (``columns/``, ``queries.columns``: made again by
every run, never reused). The folder is locked while a run works in it and deleted after the
scores are stored.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_density_index.indexer import lock

log = logging.getLogger(__name__)

#: The running column-partials file of an exact run of both sides.
COLUMNS_FILE = "imagecols.parquet"
#: Seconds between writes of that file (``RunningColumns``).
COLUMNS_EVERY = 600.0


def chunk_path(work: Path, side: str, start: int) -> Path:
    return work / f"{side}-{start:012d}.parquet"


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write ``path`` whole or not at all, and on disk before it counts as done (a power loss
    must not leave a 0-byte chunk that a rerun takes as finished)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_done(path: Path, columns: tuple[str, ...], rows: int) -> bool:
    """Whether a chunk file exists and holds what it should; an unreadable one (a crash before it
    reached the disk) is deleted and counts as not done."""
    if not path.is_file():
        return False
    try:
        meta = pq.read_metadata(path)
        ok = meta.num_rows == rows and set(columns) <= set(meta.schema.names)
    except (OSError, pa.ArrowException):
        ok = False
    if not ok:
        log.warning("chunk %s is unreadable or incomplete (interrupted write): computing it again", path)
        path.unlink(missing_ok=True)
    return ok


def write_rows(work: Path, side: str, start: int, kl: np.ndarray, klr: np.ndarray) -> None:
    """One finished chunk of ``kl_<side>`` / ``klr_<side>`` (queries ``start..start + len(kl)``)."""
    ids = np.arange(start, start + len(kl), dtype=np.int64)
    write_atomic(pa.table({"vec_id": ids, f"kl_{side}": kl, f"klr_{side}": klr}), chunk_path(work, side, start))


def rows_done(work: Path, side: str, start: int, stop: int) -> bool:
    return is_done(chunk_path(work, side, start), (f"kl_{side}", f"klr_{side}"), stop - start)


def read_side(work: Path, side: str, n: int, column: Callable[[str], np.ndarray]) -> None:
    """Copy the KL columns of one side from its chunk files into ``column("kl_<side>")`` and
    ``column("klr_<side>")`` (new (n,) float64 arrays: the run's column files,
    ``queries.columns.Columns.new``), one chunk at a time, in vec_id order."""
    names = (f"kl_{side}", f"klr_{side}")
    out = [column(name) for name in names]
    filled = 0
    for path in sorted(work.glob(f"{side}-*.parquet")):  # named by their first vec_id, zero-padded
        part = pq.read_table(path)
        ids = part.column("vec_id").to_numpy()
        if filled + len(ids) > n or not np.array_equal(ids, np.arange(filled, filled + len(ids))):
            raise RuntimeError(f"{work}: {path.name} holds vec_id {ids[:1]}..{ids[-1:]} of {side}-side KL, "
                               f"expected the {len(ids)} rows from {filled} of {n}")
        for name, values in zip(names, out):
            values[filled : filled + len(ids)] = part.column(name).to_numpy()
        filled += len(ids)
    if filled != n:
        raise RuntimeError(f"{work}: expected {n} rows of {side}-side KL, found {filled}")


def read_columns(work: Path, n: int):
    """The running column partials (``queries.exact.Moments`` over ``n`` candidates) and the set of
    chunk starts they hold; empty ones when the file is missing or damaged."""
    from clip_density_index.queries.exact import Moments

    path = work / COLUMNS_FILE
    if not is_done(path, ("max", "s0", "s1"), n):
        return Moments(n), set()
    part = pq.read_table(path)
    columns = Moments.of(*(part.column(c).to_numpy() for c in ("max", "s0", "s1")))
    return columns, set(json.loads(part.schema.metadata[b"chunks"]))


def write_columns(work: Path, columns, merged: set[int]) -> None:
    """Replace the running column partials, recording the chunks ``merged`` into them."""
    table = pa.table({"max": columns.max, "s0": columns.s0, "s1": columns.s1})
    write_atomic(table.replace_schema_metadata({"chunks": json.dumps(sorted(merged))}), work / COLUMNS_FILE)


class RunningColumns:
    """When the running column partials are written: at most every ``COLUMNS_EVERY`` seconds, and
    once at the end of the pass (``save``). The file is rewritten whole (24 bytes per image: 31 GB
    at 1.28B), so writing it after every chunk would cost more than the pass; a chunk folded in
    since the last write is not in the file's record, and a resumed run computes its columns again
    (its rows file is reused or rewritten), so it is counted once either way.

    ``merged`` is the run's set of chunk starts folded into ``columns`` (in memory)."""

    def __init__(self, work: Path, columns, merged: set[int]):
        self.work, self.columns, self.merged = work, columns, merged
        self._saved = time.monotonic()
        self._unsaved = False

    def folded(self, start: int) -> None:
        """Chunk ``start``'s column partials are in ``columns``: record it, and write the file when
        ``COLUMNS_EVERY`` seconds have passed since the last write."""
        self.merged.add(start)
        self._unsaved = True
        if time.monotonic() - self._saved >= COLUMNS_EVERY:
            self.save()

    def save(self) -> None:
        """Write the file if chunks were folded in since the last write."""
        if self._unsaved:
            write_columns(self.work, self.columns, self.merged)
            self._saved, self._unsaved = time.monotonic(), False


def remove(work: Path) -> None:
    """Delete a finished run's folder, and the index's ``work/`` folder when nothing else is in it
    (else say what interrupted runs with other options keep there)."""
    if not work.exists():
        return
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.parent.rmdir()
    except OSError:
        note_unfinished(work.parent)


def note_unfinished(folder: Path) -> None:
    """Say that interrupted runs with other options still keep their chunks (and space) in ``folder``."""
    runs = [p for p in folder.glob("score-*") if p.is_dir() and not lock.in_use(p)]  # not running ones
    if runs:
        size = sum(f.stat().st_size for p in runs for f in p.rglob("*") if f.is_file())
        log.warning("%d interrupted score run(s) with other options keep their finished chunks in %s "
                    "(%.1f MB): rerun them to resume, or delete the folder", len(runs), folder, size / 2**20)


def remove_run(work: Path) -> None:
    """Delete a run's folder whose results are not stored (auto's approximation that missed)."""
    shutil.rmtree(work, ignore_errors=True)

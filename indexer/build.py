"""Build an index directory from a source: write aside, validate, embed stats, FAISS, catalog, swap.

The new index is written into a hidden sibling directory (``.NAME.building-PID-XXXX``) and renamed
into place only once complete, so an interrupted or failed build leaves the previous index at
``out`` intact and usable.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from clip_density_index import __version__
from clip_density_index.indexer import defaults, integrity, lock, swap
from clip_density_index.indexer.arrays import NpyWriter, copy_cast
from clip_density_index.indexer.choose import parse_memory
from clip_density_index.indexer.diskspace import disk_full, is_disk_full
from clip_density_index.indexer.errors import BadInput, ClipIndexError, InvalidParameter
from clip_density_index.indexer.faults import fault_point
from clip_density_index.indexer.layout import FORMAT_VERSION, MODALITIES, IndexPaths
from clip_density_index.indexer.progress import Progress, null_progress
from clip_density_index.indexer.source import Batch, Source, SourceInfo
from clip_density_index.indexer.validate import check_rows, validate_batch
from clip_density_index.indexer.store import Store, load_sql

log = logging.getLogger(__name__)

#: Defaults of a build (values and reasons: ``indexer.defaults``); the memory budget is per FAISS index.
DEFAULT_MAX_MEMORY = parse_memory(defaults.MAX_MEMORY)
DEFAULT_BATCH = defaults.BUILD_BATCH
DEFAULT_COV_SAMPLE = defaults.COV_SAMPLE


@dataclass
class BuildReport:
    """What a build did."""

    path: Path
    source: str
    synthetic: bool
    n: int
    dim: int
    index_keys: dict[str, str]
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: int = 0
    skipped_report: Path | None = None
    replaced: bool = False  # an older index at ``path`` was replaced

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


class LimitedSource:
    """The first ``limit`` samples of another source."""

    def __init__(self, source: Source, limit: int):
        self._source = source
        self._limit = limit
        i = source.info
        self.info = SourceInfo(**{**i.__dict__, "n": min(i.n, limit)})

    @property
    def skipped(self):
        return getattr(self._source, "skipped", [])

    def batches(self, batch_size: int) -> Iterator[Batch]:
        left = self._limit
        for b in self._source.batches(batch_size):
            if left <= 0:
                return
            if b.meta.num_rows > left:
                b = Batch(b.meta.slice(0, left), b.image[:left], b.text[:left], b.origin, b.row_offset)
            left -= b.meta.num_rows
            yield b


#: What a build writes into an index directory (and ``score`` / the locks add); anything else in
#: an index at ``--out`` is the user's, and a rebuild refuses to delete it.
_INDEX_FILES = re.compile(r"^(catalog\.duckdb(\.wal|\.tmp)?|(image|text)(\.faiss|_emb\.npy|_rawnorm\.npy)"
                          r"|skipped\.tsv|work|\.lock|\.lock-swap|\.build)$")  # .tmp: DuckDB's spill folder


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise BadInput(f"Output {str(out)!r} exists and is not a directory; refusing to replace it")
    if any(out.iterdir()) and not IndexPaths(out).catalog.is_file():
        raise BadInput.naming(
            "Output {path!r} exists, is not empty and is not an index; refusing to replace it (choose another {out})",
            path=str(out))
    foreign = sorted(p.name for p in out.iterdir() if not _INDEX_FILES.match(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise BadInput.naming(
            "Output {path!r} is an index that also holds files a build did not write ({shown}); a rebuild "
            "replaces the whole directory, so move them out first (or choose another {out})", path=str(out), shown=shown)
    with lock.replacing(out):  # fail now, not after the build, when a score is running in it
        pass


def build_index(
    source: Source,
    out: str | Path,
    *,
    index_key: str | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    dtype: str = "auto",
    batch_size: int = DEFAULT_BATCH,
    nprobe: int | None = None,
    use_gpu: bool | None = None,
    limit: int | None = None,
    seed: int = 0,
    cov_sample: int = DEFAULT_COV_SAMPLE,
    progress: Progress | None = None,
) -> BuildReport:
    """Build an index directory at ``out`` from ``source``.

    Args:
        source: any ``indexer.source.Source`` (synthetic world, DataComp, clip-retrieval, open_clip).
        out: the index directory; an existing index there is replaced only when the build succeeds
            (with its scores and weights). A symbolic link is followed: its target is replaced.
        index_key: FAISS factory string; default chosen from n, dim and ``max_memory``.
        max_memory: memory budget in bytes for one modality's FAISS index.
        dtype: storage of the normalised embeddings, "float32", "float16" or "auto" (the source's
            own type: float16 for half-precision DataComp / clip-retrieval files, else float32).
        batch_size: rows per batch read from the source.
        nprobe: IVF probes stored as the index's default; default from ``choose.default_nprobe``.
        use_gpu: use GPU FAISS for training/adding; None = when one is present.
        limit: keep only the first ``limit`` samples of the source.
        seed: seed for FAISS training samples and the covariance subset.
        cov_sample: compute the covariances (``modality_stats`` ``cov`` / ``raw_cov`` / ``whiten``)
            from a seeded uniform subset of about this many rows when the pool is larger; 0 = from
            every row. Means and sums are always exact.
        progress: progress hook (see indexer.progress).

    Returns:
        A ``BuildReport``.

    Raises:
        BadInput: malformed input (the message names the file and row).
        InvalidParameter: a bad option value.
        BudgetTooSmall: no FAISS index fits ``max_memory``.
        IndexBusy: a ``score`` is running in the index at ``out``.
    """
    from clip_density_index.indexer import choose, faiss_index
    from clip_density_index.indexer.stats import StatsAccumulator, cov_row_picker

    progress = progress or null_progress
    if dtype not in ("float32", "float16", "auto"):
        raise InvalidParameter(f"dtype must be float32, float16 or auto, got {dtype!r}")
    if batch_size < 1:
        raise InvalidParameter(f"batch_size must be >= 1, got {batch_size}")
    if cov_sample < 0 or (0 < cov_sample < 2):
        raise InvalidParameter(f"cov_sample must be 0 (every row) or at least 2, got {cov_sample}")
    if index_key is not None:  # checked before the source is read, whatever else is given
        index_key = choose.parse_key(index_key).key
    if limit is not None:
        if limit < 2:
            raise InvalidParameter(f"n must be >= 2 (an index needs two samples), got {limit}")
        source = LimitedSource(source, limit)
    out = Path(out)
    if out.is_symlink():  # build beside the link's target (its disk), and replace the target
        out = out.resolve()
    swap.recover(out)  # a build killed mid-swap: its index back in place first, or garbage removed
    _check_replaceable(out)
    swap.clean_building(out)
    info = source.info
    if dtype == "auto":
        dtype = "float16" if info.dtype == "float16" else "float32"
    if "float16" in (dtype, info.dtype):
        # half-float conversions go through torch (indexer.arrays.copy_cast), whose import takes
        # ~2 s: start it now, beside the reading of the first shard. Not a daemon: a build that
        # fails early waits for the import to finish instead of killing it mid-way at exit, which
        # printed "Exception in thread ..." after the error message.
        threading.Thread(target=importlib.import_module, args=("torch",)).start()
    if info.n < 1:
        where = info.extra.get("path")
        raise BadInput(f"source {info.source!r} has no samples" + (f" ({where})" if where else ""))
    if not (info.logit_scale > 0 and np.isfinite(info.logit_scale)):
        raise InvalidParameter(f"logit scale must be a positive number, got {info.logit_scale}")

    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.building-{token}"
    paths = IndexPaths(tmp)
    seconds: dict[str, float] = {}
    writers: dict[str, NpyWriter] = {}
    had_index = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        (tmp / swap.BUILD_ID).write_text(token + "\n", encoding="ascii")  # proves a completed swap
        t_start = time.perf_counter()
        n_max, dim = info.n, info.dim
        writers = {m: NpyWriter(paths.embeddings(m), n_max, dim, dtype) for m in MODALITIES}
        rawnorm = {m: np.zeros(n_max, np.float32) for m in MODALITIES} if info.raw_known else None
        acc = {m: StatsAccumulator(dim, raw=info.raw_known, precision="float32") for m in MODALITIES}
        cov_rows_of = cov_row_picker(n_max, cov_sample, seed)
        store = Store(paths.catalog)
        store.migrate()
        segments: list[tuple[int, str, int]] = []  # (first vec_id, origin, row offset)
        pos = 0
        t0 = time.perf_counter()
        seconds["open"] = t0 - t_start
        # Files and the catalog are written by one background thread (in batch order) while the
        # main thread normalises and accumulates statistics; each modality has two row buffers,
        # one being filled while the other is written.
        buffers = {m: [np.empty((0, dim), np.float32)] * 2 for m in MODALITIES}
        pending: list[Future] = []
        with ThreadPoolExecutor(1, thread_name_prefix="build-writer") as pool, \
                progress(f"Reading {info.source}", n_max) as advance:
            for i, batch in enumerate(source.batches(batch_size)):
                validate_batch(batch, dim, check_uids=not info.uids_checked)
                b = batch.meta.num_rows
                if pos + b > n_max:
                    raise BadInput(f"{batch.origin}: source yielded more than the {n_max} rows it announced")
                if len(pending) == 2:  # the buffers of batch i - 2 are free again
                    pending.pop(0).result()
                cov_rows = cov_rows_of(b)
                normalised: dict[str, np.ndarray] = {}
                for m, arr in (("image", batch.image), ("text", batch.text)):
                    if buffers[m][i % 2].shape[0] < b:  # first use, or a larger batch
                        buffers[m][i % 2] = np.empty((b, dim), np.float32)
                    v = buffers[m][i % 2][:b]
                    copy_cast(v, arr)  # float16 / float32, maybe from a memory map -> float32
                    norms = np.sqrt(np.einsum("ij,ij->i", v, v))
                    _renorm_extremes(v, norms)
                    check_rows(batch, m, v, norms)
                    np.divide(v, norms[:, None], out=v)
                    if rawnorm is not None:
                        rawnorm[m][pos : pos + b] = norms
                    acc[m].update(v, norms if info.raw_known else None, cov_rows=cov_rows)
                    normalised[m] = v
                meta = batch.meta.add_column(0, "vec_id", pa.array(np.arange(pos, pos + b, dtype=np.int64)))
                pending.append(pool.submit(_write_batch, writers, normalised, store, meta, first=pos == 0))
                segments.append((pos, batch.origin, batch.row_offset))
                pos += b
                advance(b)
            for f in pending:
                f.result()
        seconds["read"] = time.perf_counter() - t0
        fault_point("build.after_embeddings")
        skipped = list(getattr(source, "skipped", []) or [])
        n = pos
        if n < 2:
            raise BadInput(f"source {info.source!r} yielded {n or 'no'} sample{'' if n == 1 else 's'}; an "
                           "index needs at least two")
        if n < n_max and not skipped:
            raise BadInput(f"source {info.source!r} announced {n_max} samples but yielded {n}")
        t0 = time.perf_counter()
        for m in MODALITIES:  # fewer rows than announced (skipped inputs): the files are cut to n
            writers[m].close()
        emb = {m: np.load(paths.embeddings(m), mmap_mode="r") for m in MODALITIES}
        _check_duplicate_uids(store, segments)
        store.con.execute(load_sql("samples_index"))
        seconds["check"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        stats = []
        for m in MODALITIES:
            try:
                finished = acc[m].finalize()
            except InvalidParameter as e:  # e.g. identical vectors: name the input, not a ridge
                where = info.extra.get("path") or info.source
                raise BadInput(f"{where}: the statistics of the {m} embeddings cannot be computed ({e})") from None
            stats += [(m, name, np.asarray(value, dtype=np.float64)) for name, value in finished.items()]
        _insert_stats(store, stats)
        for m in MODALITIES:
            if rawnorm is not None:
                np.save(paths.rawnorms(m), rawnorm[m][:n])
        seconds["stats"] = time.perf_counter() - t0

        key = index_key or choose.choose_index_key(n, dim, max_memory)
        probe = nprobe if nprobe is not None else choose.default_nprobe(key, n)
        t0 = time.perf_counter()
        params, ntotal = {}, {}
        for m in MODALITIES:
            if key == faiss_index.FLAT_KEY:
                # An exact index is the embedding matrix itself: no second copy is written; it is
                # made from the stored embeddings when the index is opened (indexer.pool).
                params[m] = faiss_index.flat_params(n, dim)
                continue
            try:
                index = faiss_index.build_index(key, emb[m][:n], seed=seed, use_gpu=use_gpu, progress=progress,
                                                label=f"Adding to FAISS ({m})")
            except (RuntimeError, ValueError) as e:
                if index_key is not None:
                    raise InvalidParameter(f"FAISS could not build index {index_key!r}: {e}") from None
                raise
            if probe:  # 0 for indexes without probes (Flat, HNSW)
                faiss_index.set_nprobe(index, probe)
            params[m] = faiss_index.index_params(index)
            ntotal[m] = int(index.ntotal)
            faiss_index.save_index(index, paths.faiss(m))
            del index
        seconds["faiss"] = time.perf_counter() - t0
        fault_point("build.after_faiss")

        t0 = time.perf_counter()
        extra = dict(info.extra)
        if skipped:
            report = tmp / "skipped.tsv"
            report.write_text("path\treason\n" + "".join(f"{p}\t{r}\n" for p, r in skipped), encoding="utf-8")
            extra["skipped"] = len(skipped)
            log.warning("skipped %d unreadable inputs; listed in %s", len(skipped), out / "skipped.tsv")
        store.con.execute(
            """INSERT INTO manifest VALUES ($fv, $source, $synthetic, $model, $pretrained, $dim, $scale,
                 $bias, $n, $raw, $dtype, $ikey, $tkey, $params, $created, $version, $extra)""",
            {
                "fv": FORMAT_VERSION, "source": info.source, "synthetic": bool(info.synthetic),
                "model": info.model, "pretrained": info.pretrained, "dim": dim,
                "scale": float(info.logit_scale),
                "bias": None if info.logit_bias is None else float(info.logit_bias),
                "n": n, "raw": bool(info.raw_known), "dtype": dtype, "ikey": key, "tkey": key,
                "params": json.dumps(params), "created": datetime.now(timezone.utc).replace(tzinfo=None),
                "version": __version__, "extra": json.dumps(extra),
            },
        )
        del emb
        files = integrity.record(tmp, {(m, k): v for m, k, v in stats}, ntotal,
                                 {paths.embeddings(m).name: writers[m].crc32 for m in MODALITIES})
        store.con.register("_files", pa.Table.from_pylist(files))
        store.run("data_files_insert")
        store.con.unregister("_files")
        store.con.execute("CHECKPOINT")
        store.close()
        seconds["catalog"] = time.perf_counter() - t0
        fault_point("build.before_swap")
        t0 = time.perf_counter()
        replaced = swap.swap(tmp, out, token)
        seconds["swap"] = time.perf_counter() - t0
    except BaseException as e:
        full = not isinstance(e, ClipIndexError) and is_disk_full(e, tmp if tmp.exists() else out.parent)
        if full:
            needed = _needed_bytes(info, dtype, index_key, max_memory, tmp)
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            kept = (f"the previous index at {str(out)!r} is unchanged" if had_index and out.exists()
                    else "nothing was written")
            raise disk_full(out.parent, f"the new index for {str(out)!r}", needed, kept) from None
        raise
    return BuildReport(
        path=out, source=info.source, synthetic=bool(info.synthetic), n=n, dim=dim,
        index_keys={m: key for m in MODALITIES}, seconds=seconds, skipped=len(skipped),
        skipped_report=(out / "skipped.tsv") if skipped else None, replaced=replaced,
    )


def _needed_bytes(info: SourceInfo, dtype: str, index_key: str | None, max_memory: int, tmp: Path) -> int:
    """About how many bytes a build of ``info`` writes: embeddings, raw norms, FAISS files and the
    catalog (at least what it had reached when the build failed)."""
    from clip_density_index.indexer import choose

    n, dim = info.n, info.dim
    total = 2 * n * dim * (2 if dtype == "float16" else 4) + (2 * 4 * n if info.raw_known else 0)
    try:
        key = index_key or choose.choose_index_key(n, dim, max_memory)
        if key != "Flat":
            total += 2 * choose.estimate_bytes(key, n, dim)
    except ClipIndexError:
        pass
    try:
        catalog = (tmp / "catalog.duckdb").stat().st_size
    except OSError:
        catalog = 0
    return total + max(catalog, 64 * n)


def _renorm_extremes(v: np.ndarray, norms: np.ndarray) -> None:
    """Recompute in float64 the norms float32 gets wrong: tiny vectors (their squares are subnormal
    or underflow to 0: a 1e-21-scaled vector came out with |v| off by 2e-4) and huge ones (their
    squares overflow). All-zero and non-finite rows keep their 0 / inf / NaN for ``check_rows``."""
    odd = ~(np.isfinite(norms) & (norms > _TINY_NORM))
    if odd.any():
        rows = np.flatnonzero(odd)
        x = v[rows].astype(np.float64)
        scale = np.abs(x).max(axis=1, initial=0.0)
        ok = np.isfinite(scale) & (scale > 0)
        safe = np.where(ok, scale, 1.0)
        exact = safe * np.sqrt(((x / safe[:, None]) ** 2).sum(axis=1))  # scaled: no under/overflow
        norms[rows] = np.where(ok, exact, norms[rows]).astype(norms.dtype)


#: Below this float32 norm, components are small enough that their squares lose precision.
_TINY_NORM = 1e-15


def _write_batch(writers: dict[str, NpyWriter], vectors: dict[str, np.ndarray], store: Store,
                 meta: pa.Table, first: bool) -> None:
    """Append one batch's normalised vectors to the embedding files and its rows to ``samples``."""
    for m, v in vectors.items():
        writers[m].write(v)
    store.con.register("_batch", meta)
    try:
        if first:
            store.con.execute("CREATE TABLE samples AS SELECT * FROM _batch")
        else:
            store.con.execute("INSERT INTO samples BY NAME SELECT * FROM _batch")
    finally:
        store.con.unregister("_batch")


def _insert_stats(store: Store, stats: list[tuple[str, str, np.ndarray]]) -> None:
    """Insert (modality, name, array) rows into ``modality_stats`` as one Arrow table."""

    def lists(arrays: list[np.ndarray], type_: pa.DataType) -> pa.Array:
        offsets = np.concatenate([[0], np.cumsum([a.size for a in arrays])]).astype(np.int32)
        values = np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=type_))

    table = pa.table({
        "modality": [m for m, _, _ in stats], "name": [k for _, k, _ in stats],
        "shape": lists([np.asarray(v.shape, dtype=np.int64) for _, _, v in stats], pa.int64()),
        "value": lists([v for _, _, v in stats], pa.float64()),
    })
    store.con.register("_stats", table)
    store.con.execute("INSERT INTO modality_stats BY NAME SELECT * FROM _stats")
    store.con.unregister("_stats")


def _check_duplicate_uids(store: Store, segments: list[tuple[int, str, int]]) -> None:
    row = store.con.execute(
        """SELECT uid, list(vec_id ORDER BY vec_id)[1:2] FROM samples
           GROUP BY uid HAVING count(*) > 1 ORDER BY min(vec_id) LIMIT 1"""
    ).fetchone()
    if row is None:
        return
    uid, (a, b) = row
    starts = [s[0] for s in segments]

    def where(vec_id: int) -> str:
        i = int(np.searchsorted(starts, vec_id, side="right")) - 1
        first, origin, offset = segments[i]
        return f"{origin}, row {offset + vec_id - first}"

    raise BadInput(f"duplicate uid {uid!r}: {where(a)} and {where(b)}")

"""Build an index directory from a source: write aside, validate, embed stats, FAISS, catalog, swap.

The new index is written into a hidden sibling directory (``.NAME.building-PID-XXXX``) and renamed
into place only once complete, so an interrupted or failed build leaves the previous index at
``out`` intact and usable. ``IndexBuild`` owns that directory, its writers and the catalog, with one
timed method per phase; ``build_index`` checks the options and runs the phases in order.
"""

from __future__ import annotations

import functools
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
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa

from clip_density_index import __version__
from clip_density_index.indexer import defaults, integrity, lock, remote, swap
from clip_density_index.indexer.arrays import NpyWriter
from clip_density_index.indexer.choose import parse_memory
from clip_density_index.indexer.diskspace import disk_full, is_disk_full
from clip_density_index.indexer.errors import BadInput, ClipIndexError, InvalidParameter
from clip_density_index.indexer.faults import fault_point
from clip_density_index.indexer.fs import input_path
from clip_density_index.indexer.layout import CATALOG, DATA_FILES, FORMAT_VERSION, MODALITIES, IndexPaths
from clip_density_index.indexer.normalise import normalise_rows
from clip_density_index.indexer.progress import Progress, null_progress
from clip_density_index.indexer.source import Batch, Source, SourceInfo
from clip_density_index.indexer.store import Store
from clip_density_index.indexer.validate import validate_batch

if TYPE_CHECKING:
    from clip_density_index.indexer.engine import LocalEngine, RayEngine

    Engine = LocalEngine | RayEngine

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
    engine: str = "local"  # where the reading and FAISS work ran (indexer.engine)
    uri: str | None = None  # where the index was published (``path`` is then its local mirror)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


class LimitedSource:
    """The first ``limit`` samples of another source (``whole``; read in parts, the build cuts it)."""

    def __init__(self, source: Source, limit: int):
        self._source = self.whole = source
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
_INDEX_FILES = re.compile(rf"^({DATA_FILES}|{re.escape(CATALOG)}\.tmp"  # .tmp: DuckDB's spill folder
                          r"|work|\.lock|\.lock-swap|\.build"
                          rf"|{re.escape(remote.MARKER)}|{re.escape(remote.MIRROR_LOCK)}"  # a mirror's (indexer.remote)
                          rf"|\..+{re.escape(remote.PART_SUFFIX)})$")


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
    engine: Engine | None = None,
    progress: Progress | None = None,
) -> BuildReport:
    """Build an index directory at ``out`` from ``source``.

    Args:
        source: any ``indexer.source.Source`` (synthetic world, DataComp, clip-retrieval, open_clip).
        out: the index directory; an existing index there is replaced only when the build succeeds
            (with its scores and weights). A symbolic link is followed: its target is replaced.
            A URI (``s3://bucket/idx``): the index is built in its mirror folder
            (``indexer.remote.build_dir``), then published there (``indexer.remote.publish``) and
            kept as its mirror.
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
        engine: where the reading and the FAISS lists are computed (``indexer.engine``): None or
            the local engine, in this process; a Ray engine, as tasks on its cluster for a source
            that can be split (``indexer.parallel``). The index is the same either way (statistics
            to floating-point rounding); this process writes it.
        progress: progress hook (see indexer.progress).

    Returns:
        A ``BuildReport`` (``uri`` set when ``out`` is one).

    Raises:
        BadInput: malformed input (the message names the file and row).
        InvalidParameter: a bad option value, or a URI whose protocol's fsspec package is missing.
        BudgetTooSmall: no FAISS index fits ``max_memory``.
        IndexBusy: a ``score`` is running in the index at ``out``.
        RemoteError: publishing to the URI failed (the build is kept in its mirror folder).
    """
    index_key = _check_options(dtype, batch_size, cov_sample, index_key)
    if limit is not None:
        if limit < 2:
            raise InvalidParameter(f"n must be >= 2 (an index needs two samples), got {limit}")
        source = LimitedSource(source, limit)
    uri = remote.index_uri(out)
    out = _prepare_out(remote.build_dir(uri) if uri else input_path(out))
    info = source.info
    options = BuildOptions(index_key=index_key, max_memory=max_memory, dtype=_storage_dtype(dtype, info),
                           batch_size=batch_size, nprobe=nprobe, use_gpu=use_gpu, seed=seed,
                           cov_sample=cov_sample)
    _check_source(info)
    build = IndexBuild(out, info, options, progress or null_progress, engine)
    try:
        build.open()
        build.read(source)
        fault_point("build.after_embeddings")
        build.check()
        build.statistics()
        build.faiss()
        fault_point("build.after_faiss")
        build.catalog()
        fault_point("build.before_swap")
        build.swap()
    except BaseException as e:
        build.abandon(e)
        raise
    report = build.report()
    if uri:
        t0 = time.perf_counter()
        remote.publish(out, uri, progress=progress)
        report.seconds["publish"], report.uri = time.perf_counter() - t0, uri
    return report


@dataclass(frozen=True)
class BuildOptions:
    """The checked options of one build (``build_index``'s arguments; ``dtype`` resolved)."""

    index_key: str | None
    max_memory: int
    dtype: str  # "float32" | "float16"
    batch_size: int
    nprobe: int | None
    use_gpu: bool | None
    seed: int
    cov_sample: int


def _check_options(dtype: str, batch_size: int, cov_sample: int, index_key: str | None) -> str | None:
    """The options checked before anything is read; returns the index key in its canonical form."""
    from clip_density_index.indexer import choose

    if dtype not in ("float32", "float16", "auto"):
        raise InvalidParameter(f"dtype must be float32, float16 or auto, got {dtype!r}")
    if batch_size < 1:
        raise InvalidParameter(f"batch_size must be >= 1, got {batch_size}")
    if cov_sample < 0 or (0 < cov_sample < 2):
        raise InvalidParameter(f"cov_sample must be 0 (every row) or at least 2, got {cov_sample}")
    if index_key is not None:  # checked before the source is read, whatever else is given
        index_key = choose.parse_key(index_key).key
    return index_key


def _prepare_out(out: Path) -> Path:
    """The directory to replace (a symbolic link's target), after recovering a killed build's
    state there and checking that the build may replace it."""
    if out.is_symlink():  # build beside the link's target (its disk), and replace the target
        out = out.resolve()
    swap.recover(out)  # a build killed mid-swap: its index back in place first, or garbage removed
    _check_replaceable(out)
    swap.clean_building(out)
    return out


def _storage_dtype(dtype: str, info: SourceInfo) -> str:
    """The stored type of the embeddings ("auto": the source's own). Starts the import of torch
    when half floats will be converted."""
    if dtype == "auto":
        dtype = "float16" if info.dtype == "float16" else "float32"
    if "float16" in (dtype, info.dtype):
        # half-float conversions go through torch (indexer.arrays.copy_cast), whose import takes
        # ~2 s: start it now, beside the reading of the first shard. Not a daemon: a build that
        # fails early waits for the import to finish instead of killing it mid-way at exit, which
        # printed "Exception in thread ..." after the error message.
        threading.Thread(target=importlib.import_module, args=("torch",)).start()
    return dtype


def _check_source(info: SourceInfo) -> None:
    if info.n < 1:
        where = info.extra.get("path")
        raise BadInput(f"source {info.source!r} has no samples" + (f" ({where})" if where else ""))
    if not (info.logit_scale > 0 and np.isfinite(info.logit_scale)):
        raise InvalidParameter(f"logit scale must be a positive number, got {info.logit_scale}")


def _phase(name: str):
    """Record the wall time of a successful phase method in ``self.seconds[name]``."""

    def wrap(method):
        @functools.wraps(method)
        def timed(self, *args, **kwargs):
            t0 = time.perf_counter()
            result = method(self, *args, **kwargs)
            self.seconds[name] = time.perf_counter() - t0
            return result

        return timed

    return wrap


class IndexBuild:
    """One build in progress: the temporary directory beside ``out`` it writes into, its embedding
    writers and catalog, and what each phase found; ``abandon`` removes all of it.

    Phases, in order (each timed in ``seconds``): ``open``, ``read`` (validate, normalise,
    accumulate statistics, write embeddings and samples), ``check`` (row counts, unique uids),
    ``statistics``, ``faiss``, ``catalog`` (manifest, integrity records), ``swap``.
    """

    def __init__(self, out: Path, info: SourceInfo, options: BuildOptions, progress: Progress,
                 engine: Engine | None = None):
        self.out, self.info, self.options, self.progress = out, info, options, progress
        self.engine = engine if engine is not None and engine.name != "local" else None
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = out.parent / f".{out.name}.building-{self.token}"
        self.paths = IndexPaths(self.tmp)
        self.had_index = out.exists()
        self.seconds: dict[str, float] = {}
        self.writers: dict[str, NpyWriter] = {}
        self.n = 0  # rows read so far
        self.segments: list[tuple[int, str, int]] = []  # (first vec_id, origin, row offset)
        self.skipped: list[tuple[str, str]] = []
        self.stats: list[tuple[str, str, np.ndarray]] = []
        self.key: str | None = None
        self.params: dict[str, dict] = {}
        self.ntotal: dict[str, int] = {}
        self.replaced = False

    @_phase("open")
    def open(self) -> None:
        """Create the temporary directory, the embedding writers, the statistics and the catalog."""
        from clip_density_index.indexer.stats import StatsAccumulator, cov_row_picker

        info, opts = self.info, self.options
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        (self.tmp / swap.BUILD_ID).write_text(self.token + "\n", encoding="ascii")  # proves a completed swap
        self.writers = {m: NpyWriter(self.paths.embeddings(m), info.n, info.dim, opts.dtype) for m in MODALITIES}
        self.rawnorm = {m: np.zeros(info.n, np.float32) for m in MODALITIES} if info.raw_known else None
        self.acc = {m: StatsAccumulator(info.dim, raw=info.raw_known, precision="float32") for m in MODALITIES}
        self.cov_rows_of = cov_row_picker(info.n, opts.cov_sample, opts.seed)
        self.store = Store(self.paths.catalog)
        self.store.migrate()

    @_phase("read")
    def read(self, source: Source) -> None:
        """Read every batch: validate, normalise, accumulate statistics; the embeddings and the
        ``samples`` rows are written by a background thread, in batch order, while the next batch
        is normalised (each modality has two row buffers: one filled while the other is written).
        With an engine, a source that can be split is read in parts by its workers instead."""
        from clip_density_index.indexer import parallel

        whole = getattr(source, "whole", source)
        if self.engine is not None and parallel.can_split(whole):
            return self._read_parts(whole)
        if self.engine is not None:
            log.warning("source %s cannot be read in parts: reading it in this process", self.info.source)
        info = self.info
        dim = info.dim
        buffers = {m: [np.empty((0, dim), np.float32)] * 2 for m in MODALITIES}
        pending: list[Future] = []
        with ThreadPoolExecutor(1, thread_name_prefix="build-writer") as pool, \
                self.progress(f"Reading {info.source}", info.n) as advance:
            for i, batch in enumerate(source.batches(self.options.batch_size)):
                validate_batch(batch, dim, check_uids=not info.uids_checked)
                b = batch.meta.num_rows
                if self.n + b > info.n:
                    raise BadInput(f"{batch.origin}: source yielded more than the {info.n} rows it announced")
                if len(pending) == 2:  # the buffers of batch i - 2 are free again
                    pending.pop(0).result()
                for m in MODALITIES:
                    if buffers[m][i % 2].shape[0] < b:  # first use, or a larger batch
                        buffers[m][i % 2] = np.empty((b, dim), np.float32)
                vectors = self._normalise(batch, {m: buffers[m][i % 2][:b] for m in MODALITIES})
                pending.append(pool.submit(self._write, vectors, batch.meta, self.n))
                self.segments.append((self.n, batch.origin, batch.row_offset))
                self.n += b
                advance(b)
            for f in pending:
                f.result()
        self.skipped = list(getattr(source, "skipped", []) or [])

    def _read_parts(self, source: Source) -> None:
        """The read phase on an engine: the parts of ``source`` read, validated and normalised by
        its workers (``indexer.parallel``); here, in pool order, their rows are written and their
        statistics merged."""
        from clip_density_index.indexer import parallel

        info, opts = self.info, self.options
        settings = parallel.ReadSettings(dim=info.dim, n=info.n, raw=info.raw_known,
                                         check_uids=not info.uids_checked, batch_size=opts.batch_size,
                                         cov_sample=opts.cov_sample, seed=opts.seed)
        parts = list(source.parts())
        self.skipped = list(getattr(source, "skipped", []) or [])  # found while listing (damaged shards)
        finish = getattr(source, "finish_part", None)
        pending: list[Future] = []
        with ThreadPoolExecutor(1, thread_name_prefix="build-writer") as pool, \
                self.progress(f"Reading {info.source}", info.n) as advance:
            for read in parallel.parts_in_order(self.engine, source, parts, settings, info.n):
                self.skipped += read.skipped
                if not read.rows:
                    continue
                pos, b = self.n, read.rows
                for m in MODALITIES:
                    self.acc[m].merge(read.stats[m])
                    if self.rawnorm is not None:
                        self.rawnorm[m][pos : pos + b] = read.norms[m]
                self.segments += [(pos + first, origin, offset) for first, origin, offset in read.segments]
                if len(pending) == 2:  # at most two parts waiting to be written
                    pending.pop(0).result()
                meta = finish(read.meta) if finish is not None else read.meta
                pending.append(pool.submit(self._write, read.vectors, meta, pos))
                self.n += b
                advance(b)
            for f in pending:
                f.result()

    def _normalise(self, batch: Batch, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Normalise one batch into ``out`` (per modality, float32 rows), keep its raw norms and
        add it to the statistics."""
        pos, b, raw = self.n, batch.meta.num_rows, self.info.raw_known
        cov_rows = self.cov_rows_of(b)
        for m, arr in (("image", batch.image), ("text", batch.text)):
            norms = normalise_rows(batch, m, arr, out[m])
            if raw:
                self.rawnorm[m][pos : pos + b] = norms
            self.acc[m].update(out[m], norms if raw else None, cov_rows=cov_rows)
        return out

    def _write(self, vectors: dict[str, np.ndarray], meta: pa.Table, first: int) -> None:
        """Append one batch's normalised vectors to the embedding files and its rows to ``samples``,
        with ``vec_id`` = ``first`` + row (batches are written in order: the first creates the table)."""
        for m, v in vectors.items():
            self.writers[m].write(v)
        ids = pa.array(np.arange(first, first + meta.num_rows, dtype=np.int64))
        self.store.write_samples(meta.add_column(0, "vec_id", ids), create=first == 0)

    @_phase("check")
    def check(self) -> None:
        """The row count against the source's, the embedding files cut to it, uids unique."""
        info, n = self.info, self.n
        if n < 2:
            raise BadInput(f"source {info.source!r} yielded {n or 'no'} sample{'' if n == 1 else 's'}; an "
                           "index needs at least two")
        if n < info.n and not self.skipped:
            raise BadInput(f"source {info.source!r} announced {info.n} samples but yielded {n}")
        for m in MODALITIES:  # fewer rows than announced (skipped inputs): the files are cut to n
            self.writers[m].close()
        _check_duplicate_uids(self.store, self.segments)
        self.store.index_samples()

    @_phase("stats")
    def statistics(self) -> None:
        """Finish the statistics into ``modality_stats``; write the raw norms."""
        for m in MODALITIES:
            try:
                finished = self.acc[m].finalize()
            except InvalidParameter as e:  # e.g. identical vectors: name the input, not a ridge
                where = self.info.extra.get("path") or self.info.source
                raise BadInput(f"{where}: the statistics of the {m} embeddings cannot be computed ({e})") from None
            self.stats += [(m, name, np.asarray(value, dtype=np.float64)) for name, value in finished.items()]
        _insert_stats(self.store, self.stats)
        if self.rawnorm is not None:
            for m in MODALITIES:
                np.save(self.paths.rawnorms(m), self.rawnorm[m][: self.n])

    @_phase("faiss")
    def faiss(self) -> None:
        """One FAISS index per modality (none for Flat: the stored embeddings are the index)."""
        from clip_density_index.indexer import choose, faiss_index

        n, dim, opts = self.n, self.info.dim, self.options
        self.key = key = opts.index_key or choose.choose_index_key(n, dim, opts.max_memory)
        probe = opts.nprobe if opts.nprobe is not None else choose.default_nprobe(key, n)
        for m in MODALITIES:
            if key == faiss_index.FLAT_KEY:
                # An exact index is the embedding matrix itself: no second copy is written; it is
                # made from the stored embeddings when the index is opened (indexer.pool).
                self.params[m] = faiss_index.flat_params(n, dim)
                continue
            try:
                index = self._faiss_index(key, m)
            except (RuntimeError, ValueError) as e:
                if opts.index_key is not None:
                    raise InvalidParameter(f"FAISS could not build index {opts.index_key!r}: {e}") from None
                raise
            if probe:  # 0 for indexes without probes (Flat, HNSW)
                faiss_index.set_nprobe(index, probe)
            self.params[m] = faiss_index.index_params(index)
            self.ntotal[m] = int(index.ntotal)
            faiss_index.save_index(index, self.paths.faiss(m))
            del index

    def _faiss_index(self, key: str, modality: str):
        """The FAISS index of one modality over its written embeddings: built here, or trained
        here and filled by the engine's workers."""
        from clip_density_index.indexer import faiss_index, parallel

        opts, path, label = self.options, self.paths.embeddings(modality), f"Adding to FAISS ({modality})"
        if self.engine is not None:
            return parallel.build_faiss(self.engine, key, path, seed=opts.seed, use_gpu=opts.use_gpu,
                                        progress=self.progress, label=label)
        emb = np.load(path, mmap_mode="r")
        return faiss_index.build_index(key, emb[: self.n], seed=opts.seed, use_gpu=opts.use_gpu,
                                       progress=self.progress, label=label)

    @_phase("catalog")
    def catalog(self) -> None:
        """The skipped-inputs report, the manifest and the data files' integrity records; the
        catalog checkpointed and closed."""
        info, opts = self.info, self.options
        extra = dict(info.extra)
        if self.skipped:
            report = self.tmp / "skipped.tsv"
            report.write_text("path\treason\n" + "".join(f"{p}\t{r}\n" for p, r in self.skipped),
                              encoding="utf-8")
            extra["skipped"] = len(self.skipped)
            log.warning("skipped %d unreadable inputs; listed in %s", len(self.skipped), self.out / "skipped.tsv")
        self.store.insert_manifest(
            format_version=FORMAT_VERSION, source=info.source, synthetic=bool(info.synthetic),
            model=info.model, pretrained=info.pretrained, dim=info.dim, logit_scale=float(info.logit_scale),
            logit_bias=None if info.logit_bias is None else float(info.logit_bias),
            n=self.n, raw_known=bool(info.raw_known), embedding_dtype=opts.dtype,
            image_index=self.key, text_index=self.key, index_params=json.dumps(self.params),
            created_at=datetime.now(timezone.utc).replace(tzinfo=None), tool_version=__version__,
            extra=json.dumps(extra),
        )
        files = integrity.record(self.tmp, {(m, k): v for m, k, v in self.stats}, self.ntotal,
                                 {self.paths.embeddings(m).name: self.writers[m].crc32 for m in MODALITIES})
        self.store.insert_data_files(files)
        self.store.finish_catalog()
        self.store.close()

    @_phase("swap")
    def swap(self) -> None:
        """Put the finished index in place of ``out`` (``indexer.swap``)."""
        self.replaced = swap.swap(self.tmp, self.out, self.token)

    def abandon(self, e: BaseException) -> None:
        """Remove everything this build wrote, after an error or an interruption ``e``; a full disk
        is raised as ``DiskFull`` naming the space needed and what is intact."""
        tmp, out, opts = self.tmp, self.out, self.options
        full = not isinstance(e, ClipIndexError) and is_disk_full(e, tmp if tmp.exists() else out.parent)
        if full:
            needed = _needed_bytes(self.info, opts.dtype, opts.index_key, opts.max_memory, tmp)
        for w in self.writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            kept = (f"the previous index at {str(out)!r} is unchanged" if self.had_index and out.exists()
                    else "nothing was written")
            raise disk_full(out.parent, f"the new index for {str(out)!r}", needed, kept) from None

    def report(self) -> BuildReport:
        return BuildReport(
            path=self.out, source=self.info.source, synthetic=bool(self.info.synthetic), n=self.n,
            dim=self.info.dim, index_keys={m: self.key for m in MODALITIES}, seconds=self.seconds,
            skipped=len(self.skipped), skipped_report=(self.out / "skipped.tsv") if self.skipped else None,
            replaced=self.replaced, engine=self.engine.name if self.engine is not None else "local",
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


def _insert_stats(store: Store, stats: list[tuple[str, str, np.ndarray]]) -> None:
    """Insert (modality, name, array) rows into ``modality_stats``."""
    store.insert_stats(stats)


def _check_duplicate_uids(store: Store, segments: list[tuple[int, str, int]]) -> None:
    """``BadInput`` naming the files and rows of the first uid two samples share."""
    found = store.first_duplicate_uid()
    if found is None:
        return
    uid, a, b = found
    starts = [s[0] for s in segments]

    def where(vec_id: int) -> str:
        i = int(np.searchsorted(starts, vec_id, side="right")) - 1
        first, origin, offset = segments[i]
        return f"{origin}, row {offset + vec_id - first}"

    raise BadInput(f"duplicate uid {uid!r}: {where(a)} and {where(b)}")

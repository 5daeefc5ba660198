"""Build, save, load and search FAISS indexes over normalised embeddings (inner product = cosine).

Ids are always ``vec_id`` = row number (int64): IVF indexes take ids natively, other indexes are
wrapped in ``faiss.IndexIDMap``. The metric is always ``METRIC_INNER_PRODUCT``.

Building is two steps, ``train_index`` (a seeded sample, k-means) and ``add_vectors`` (rows with
their ids); ``build_index`` does both. The adding can be split by rows: indexes filled apart from one
trained copy are merged with ``merge_lists`` (what the Ray build does).

GPU: when the faiss build has GPUs (``faiss.get_num_gpus() > 0``), IVF indexes are trained and
filled on the GPU and copied back to the CPU before ``train_index`` / ``add_vectors`` return, so that
they can be saved. Flat and HNSW indexes are always built on the CPU (a GPU gains nothing for Flat and has no
HNSW). ``search(..., use_gpu=True)`` and ``to_gpu`` copy a CPU index to the GPU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import faiss
import numpy as np

from clip_density_index.indexer import layout
from clip_density_index.indexer.choose import MIN_POINTS_PER_CENTROID
from clip_density_index.indexer.errors import IndexNotFound, InvalidParameter
from clip_density_index.indexer.progress import Progress, null_progress

logger = logging.getLogger(__name__)

#: PQ codebooks have 256 centroids per sub-quantiser; k-means wants 39 points per centroid.
_PQ_TRAIN_MIN = MIN_POINTS_PER_CENTROID * 256

_gpu_resources: Any = None


# -- GPU helpers ----------------------------------------------------------------------------
def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return (
        hasattr(faiss, "get_num_gpus")
        and hasattr(faiss, "StandardGpuResources")
        and faiss.get_num_gpus() > 0
    )


def _resources() -> Any:
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return _gpu_resources


def is_gpu_index(index: faiss.Index) -> bool:
    """True when ``index`` lives on a GPU (a ``faiss.GpuIndex*``)."""
    return type(index).__name__.startswith("Gpu")


def to_gpu(index: faiss.Index, device: int = 0) -> faiss.Index:
    """Copy a CPU index to GPU ``device`` (a no-op for an index already on a GPU).

    Copy once and search many times: ``search(..., use_gpu=True)`` copies on every call.

    Raises:
        InvalidParameter: this faiss build has no GPU support or sees no GPU.
    """
    if is_gpu_index(index):
        return index
    if not gpu_available():
        raise InvalidParameter("use_gpu=True, but this faiss build sees no GPU (install faiss-gpu)")
    return faiss.index_cpu_to_gpu(_resources(), device, index)


def to_cpu(index: faiss.Index) -> faiss.Index:
    """Copy a GPU index back to the CPU (a no-op for a CPU index)."""
    return faiss.index_gpu_to_cpu(index) if is_gpu_index(index) else index


def _resolve_gpu(use_gpu: bool | None) -> bool:
    if use_gpu is None:
        return gpu_available()
    if use_gpu and not gpu_available():
        raise InvalidParameter("use_gpu=True, but this faiss build sees no GPU (install faiss-gpu)")
    return bool(use_gpu)


# -- small helpers --------------------------------------------------------------------------
@contextlib.contextmanager
def _timed(what: str) -> Iterator[None]:
    logger.info("%s ...", what)
    t0 = time.perf_counter()
    yield
    logger.info("%s: %.2f s", what, time.perf_counter() - t0)


def _as_f32(x: np.ndarray) -> np.ndarray:
    """A float32 C-contiguous copy (or view, when it already is one) of a 2-D array."""
    return np.ascontiguousarray(x, dtype=np.float32)


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF inside ``index`` (through IDMap / pre-transforms), or None (also for GPU indexes)."""
    if is_gpu_index(index):
        return None
    return faiss.try_extract_index_ivf(index)


def _unwrap(index: faiss.Index) -> faiss.Index:
    """The concrete index under ``IndexIDMap`` / ``IndexIDMap2`` / ``IndexPreTransform`` wrappers."""
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index


def default_train_size(index: faiss.Index, n: int) -> int:
    """Training vectors ``build_index`` samples when ``train_size`` is None.

    ``39 * nlist`` for IVF (FAISS warns below 39 points per k-means centroid and subsamples
    above 256); at least ``39 * 256 = 9,984`` when there are PQ codebooks (256 centroids per
    sub-quantiser) or for any other trainable index; capped at n.
    """
    ivf = _ivf(index)
    if ivf is None:
        return min(n, _PQ_TRAIN_MIN)
    want = MIN_POINTS_PER_CENTROID * ivf.nlist
    if isinstance(_unwrap(index), faiss.IndexIVFPQ):
        want = max(want, _PQ_TRAIN_MIN)
    return min(n, want)


def _check_vectors(vectors: np.ndarray) -> tuple[int, int]:
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2:
        raise InvalidParameter(
            f"vectors must be a 2-D numpy array (n, dim), got {type(vectors).__name__} "
            f"with shape {getattr(vectors, 'shape', None)}"
        )
    if vectors.dtype not in (np.float16, np.float32, np.float64):
        raise InvalidParameter(f"vectors must be float16/32/64, got dtype {vectors.dtype}")
    n, d = vectors.shape
    if n < 1 or d < 1:
        raise InvalidParameter(f"vectors must be non-empty, got shape {vectors.shape}")
    return n, d


def _sample_rows(vectors: np.ndarray, size: int, seed: int, chunk: int) -> np.ndarray:
    """A seeded uniform sample of ``size`` rows (sorted, read chunk by chunk) as float32."""
    n, d = vectors.shape
    if size >= n:
        rows = np.arange(n)
    else:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    out = np.empty((len(rows), d), dtype=np.float32)
    for s in range(0, len(rows), chunk):
        out[s : s + chunk] = vectors[rows[s : s + chunk]]
    return out


# -- build: train, then add -----------------------------------------------------------------
def new_index(key: str, dim: int, seed: int = 0) -> faiss.Index:
    """An empty, untrained index for ``key`` (inner product; a non-IVF index wrapped in
    ``IndexIDMap`` so that it takes ids), its k-means seeded with ``seed``.

    Raises:
        InvalidParameter: a key FAISS's ``index_factory`` refuses for ``dim``.
    """
    try:
        index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise InvalidParameter(f"Invalid FAISS index key {key!r} for dim={dim}: {e}") from None
    ivf = _ivf(index)
    if ivf is None and not isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.IndexIDMap(index)  # the python wrapper keeps a reference to the inner index
    if ivf is not None:
        ivf.cp.seed = seed
    sub = _unwrap(index)
    if isinstance(sub, faiss.IndexIVFPQ):
        sub.pq.cp.seed = seed
        # index_factory turns on polysemous training (code reordering for Hamming filtering),
        # which this project never uses and which makes training several times slower.
        sub.do_polysemous_training = False
    return index


def _on_device(index: faiss.Index, key: str, use_gpu: bool | None) -> tuple[faiss.Index, bool]:
    """``(index to work on, on the GPU)``: IVF indexes go to the GPU when ``use_gpu`` asks for it
    (None: when one is present); a key the GPU cannot hold stays on the CPU (an error when
    ``use_gpu`` is True)."""
    gpu = _resolve_gpu(use_gpu) and _ivf(index) is not None
    if not gpu:
        return index, False
    try:
        return to_gpu(index), True
    except RuntimeError as e:
        if use_gpu:
            raise InvalidParameter(f"Index key {key!r} cannot be built on the GPU: {e}") from None
        logger.warning("Index key %r cannot be built on the GPU (%s); building on the CPU", key, e)
        return index, False


def _train_size(index: faiss.Index, key: str, n: int, train_size: int | None) -> int:
    """The training sample size asked for (default ``default_train_size``), checked against n
    and the index's lists."""
    ivf = _ivf(index)
    size = default_train_size(index, n) if train_size is None else int(train_size)
    if size < 1 or size > n:
        raise InvalidParameter(f"Invalid train_size={train_size}: must be between 1 and n={n}")
    if ivf is not None and size < ivf.nlist:
        raise InvalidParameter(f"train_size={size} is below nlist={ivf.nlist} for index key {key!r}")
    if ivf is not None and size < MIN_POINTS_PER_CENTROID * ivf.nlist:
        logger.warning("Training %s on %d vectors, fewer than %d per list (%d); clustering may be poor",
                       key, size, MIN_POINTS_PER_CENTROID, MIN_POINTS_PER_CENTROID * ivf.nlist)
    return size


def train_index(key: str, vectors: np.ndarray, *, train_size: int | None = None, seed: int = 0,
                chunk: int = 65536, use_gpu: bool | None = None) -> faiss.Index:
    """An empty index for ``key``, trained on a seeded uniform sample of ``vectors``.

    Args:
        key: FAISS factory string (see ``indexer.choose``), e.g. ``"IVF4096,Flat"``. Any factory
            string works; non-IVF indexes are wrapped in ``IndexIDMap``.
        vectors: (n, dim) float16 / float32 / float64 array, typically a memory map; the sample
            is read and converted to float32 chunk by chunk.
        train_size: training vectors, sampled uniformly (seeded) from ``vectors``; default
            ``default_train_size``. Ignored for indexes that need no training (Flat, HNSW).
        seed: seeds the training sample and FAISS k-means.
        chunk: rows read per step of the sample.
        use_gpu: True: train IVF indexes on the GPU; False: CPU; None: GPU when available.

    Returns:
        A CPU index with ``ntotal == 0``, ready for ``add_vectors``.

    Raises:
        InvalidParameter: bad key, vectors or train_size (e.g. fewer vectors than IVF lists), or
            ``use_gpu=True`` without a GPU.
    """
    n, d = _check_vectors(vectors)
    if chunk < 1:
        raise InvalidParameter(f"Invalid chunk={chunk}: must be at least 1")
    index = new_index(key, d, seed)
    ivf = _ivf(index)
    if ivf is not None and ivf.nlist > n:
        raise InvalidParameter(
            f"Index key {key!r} has nlist={ivf.nlist} lists but there are only n={n} vectors; "
            "choose a smaller nlist (see indexer.choose.default_nlist)"
        )
    work, gpu = _on_device(index, key, use_gpu)
    logger.info("Training %s for %d x %d vectors (%s) on %s", key, n, d, vectors.dtype, "GPU" if gpu else "CPU")
    if work.is_trained:
        return index
    size = _train_size(index, key, n, train_size)
    with _timed(f"Sampling {size:,} training vectors"):
        sample = _sample_rows(vectors, size, seed, chunk)
    with _timed(f"Training {key} on {size:,} vectors"):
        work.train(sample)
    return to_cpu(work) if gpu else index


def add_vectors(index: faiss.Index, vectors: np.ndarray, *, start: int = 0, stop: int | None = None,
                chunk: int = 65536, use_gpu: bool | None = None, progress: Progress | None = None,
                label: str = "Adding to FAISS") -> faiss.Index:
    """Add rows ``[start, stop)`` of ``vectors`` to a trained index, with ids = row numbers.

    Args:
        index: a trained CPU index (``train_index``).
        vectors: (n, dim) float16 / float32 / float64 array, typically a memory map; read and
            converted to float32 chunk by chunk.
        start, stop: the rows to add (default: all).
        chunk: rows converted and added per call.
        use_gpu: True: add to IVF indexes on the GPU; False: CPU; None: GPU when available.
        progress: hook called as ``progress(label, rows)``; advanced by the rows added.
        label: progress label, e.g. ``"Adding to FAISS (image)"``.

    Returns:
        The CPU index holding the added rows (``index`` itself, or its copy back from the GPU).
    """
    n, _ = _check_vectors(vectors)
    stop = n if stop is None else stop
    if chunk < 1:
        raise InvalidParameter(f"Invalid chunk={chunk}: must be at least 1")
    if not 0 <= start <= stop <= n:
        raise InvalidParameter(f"Invalid rows [{start}, {stop}) of {n} vectors")
    work, gpu = _on_device(index, index_key(index), use_gpu)
    with _timed(f"Adding {stop - start:,} vectors to {index_key(index)}"):
        with (progress or null_progress)(label, stop - start) as advance:
            for lo in range(start, stop, chunk):
                hi = min(lo + chunk, stop)
                work.add_with_ids(_as_f32(vectors[lo:hi]), np.arange(lo, hi, dtype=np.int64))
                advance(hi - lo)
    if gpu:
        with _timed("Copying the index from GPU to CPU"):
            return to_cpu(work)
    return index


def build_index(
    key: str,
    vectors: np.ndarray,
    *,
    train_size: int | None = None,
    seed: int = 0,
    chunk: int = 65536,
    use_gpu: bool | None = None,
    progress: Progress | None = None,
    label: str = "Adding to FAISS",
) -> faiss.Index:
    """``train_index`` then ``add_vectors`` over every row: a CPU index with ``ntotal == n``,
    metric inner product, ids ``0 .. n-1`` (arguments as theirs)."""
    index = train_index(key, vectors, train_size=train_size, seed=seed, chunk=chunk, use_gpu=use_gpu)
    return add_vectors(index, vectors, chunk=chunk, use_gpu=use_gpu, progress=progress, label=label)


def can_merge_lists(index: faiss.Index) -> bool:
    """True when parts of ``index`` filled apart can be merged (``merge_lists``): IVF indexes,
    also under a pre-transform. Graph indexes (HNSW) are built in one place."""
    return _ivf(index) is not None


def merge_lists(index: faiss.Index, part: faiss.Index) -> None:
    """Append the inverted lists of ``part`` (a copy of the same trained index, filled with other
    rows) to ``index``; ids are kept. Merging parts in row order gives the lists, and the search
    results, of adding every row to one index in that order."""
    faiss.merge_into(index, part, False)


def serialize(index: faiss.Index) -> np.ndarray:
    """The index as bytes (a uint8 array): what crosses between processes."""
    return faiss.serialize_index(to_cpu(index))


def deserialize(data: np.ndarray) -> faiss.Index:
    return faiss.deserialize_index(np.asarray(data, dtype=np.uint8))


# -- exact (Flat) indexes -------------------------------------------------------------------
#: The factory string of an exact index (``indexer.layout.FLAT_KEY``). The builder writes no file
#: for it: the index is the stored embedding matrix, copied into an ``IndexFlatIP`` when the index
#: directory is opened.
FLAT_KEY = layout.FLAT_KEY


def flat_index(vectors: np.ndarray, chunk: int = 65536) -> faiss.Index:
    """An exact inner-product index over ``vectors`` (ids = row numbers), filled chunk by chunk
    (float16 / memory-mapped input is converted to float32 on the way)."""
    n, d = _check_vectors(vectors)
    index = faiss.IndexFlatIP(d)
    with _timed(f"Loading {n:,} vectors into an exact index"):
        for start in range(0, n, chunk):
            index.add(_as_f32(vectors[start : start + chunk]))
    return index


def flat_params(n: int, dim: int) -> dict:
    """``index_params`` of the exact index over n stored vectors, with ``"file": None``."""
    return {**index_params(faiss.IndexFlatIP(int(dim))), "ntotal": int(n), "file": None}


# -- save / load ----------------------------------------------------------------------------
def save_index(index: faiss.Index, path: str | Path) -> None:
    """Write ``index`` to ``path`` (a GPU index is copied to the CPU first)."""
    with _timed(f"Writing {path}"):
        faiss.write_index(to_cpu(index), str(path))


def load_index(path: str | Path, mmap: bool = False) -> faiss.Index:
    """Read an index written by ``save_index``.

    Args:
        path: the ``.faiss`` file.
        mmap: map the IVF inverted lists read-only from the file instead of reading them into
            memory (``IO_FLAG_MMAP | IO_FLAG_READ_ONLY``); a Flat index is still read into memory.

    Raises:
        IndexNotFound: the file does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise IndexNotFound(f"FAISS index file {str(p)!r} does not exist")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    with _timed(f"Reading {p}{' (mmap)' if mmap else ''}"):
        return faiss.read_index(str(p), flags)


# -- parameters -----------------------------------------------------------------------------
def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set how many IVF lists each search visits (clamped to nlist).

    A no-op for indexes without lists (Flat, HNSW), so callers can pass one setting to any index.

    Raises:
        InvalidParameter: nprobe < 1.
    """
    if int(nprobe) < 1:
        raise InvalidParameter(f"Invalid nprobe={nprobe}: must be at least 1")
    ivf = _ivf(index)
    if ivf is not None:
        ivf.nprobe = min(int(nprobe), ivf.nlist)
    elif is_gpu_index(index) and hasattr(index, "nprobe"):
        index.nprobe = min(int(nprobe), int(index.nlist))
    else:
        logger.debug("set_nprobe(%d) ignored: %s has no inverted lists", nprobe, type(index).__name__)


def returns_exact_scores(index: faiss.Index) -> bool:
    """True when search scores are exact inner products of the stored float32 vectors.

    True for Flat, IVF*,Flat and HNSW*,Flat (the candidate set may be approximate, the scores are
    not); False for SQ / PQ codes (rescore the candidates from the stored embeddings) and for
    anything unrecognised.
    """
    sub = _unwrap(index)
    exact = (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexHNSWFlat)
    if isinstance(sub, exact):
        return True
    return type(sub).__name__ in ("GpuIndexFlat", "GpuIndexFlatIP", "GpuIndexIVFFlat")


def index_key(index: faiss.Index) -> str:
    """The factory string of an index built by ``build_index`` (reconstructed from its type).

    Returns ``"Flat"``, ``"IVF{nlist},Flat"``, ``"IVF{nlist},SQ8"``, ``"IVF{nlist},PQ{m}"``,
    ``"HNSW{M},Flat"``, or the class name for other indexes.
    """
    sub = _unwrap(to_cpu(index))
    if isinstance(sub, faiss.IndexIVFFlat):
        return f"IVF{sub.nlist},Flat"
    if isinstance(sub, faiss.IndexIVFScalarQuantizer):
        qt = {faiss.ScalarQuantizer.QT_8bit: "SQ8", faiss.ScalarQuantizer.QT_4bit: "SQ4",
              faiss.ScalarQuantizer.QT_fp16: "SQfp16"}.get(sub.sq.qtype, "SQ")
        return f"IVF{sub.nlist},{qt}"
    if isinstance(sub, faiss.IndexIVFPQ):
        bits = "" if sub.pq.nbits == 8 else f"x{sub.pq.nbits}"
        return f"IVF{sub.nlist},PQ{sub.pq.M}{bits}"
    if isinstance(sub, faiss.IndexHNSWFlat):
        return f"HNSW{sub.hnsw.nb_neighbors(1)},Flat"
    if isinstance(sub, faiss.IndexFlat):
        return "Flat"
    return type(sub).__name__


def index_params(index: faiss.Index) -> dict:
    """JSON-able description of an index, for the manifest's ``index_params``.

    Keys: ``key`` (factory string, see ``index_key``), ``nlist`` and ``nprobe`` (None without
    lists), ``exact_scores``, ``ntotal``, ``dim``, ``metric`` (``"inner_product"``) and ``gpu``.
    """
    ivf = _ivf(index)
    nlist = nprobe = None
    if ivf is not None:
        nlist, nprobe = int(ivf.nlist), int(ivf.nprobe)
    elif is_gpu_index(index) and hasattr(index, "nlist"):
        nlist, nprobe = int(index.nlist), int(index.nprobe)
    metric = {faiss.METRIC_INNER_PRODUCT: "inner_product", faiss.METRIC_L2: "l2"}.get(
        index.metric_type, str(index.metric_type)
    )
    return {
        "key": index_key(index),
        "nlist": nlist,
        "nprobe": nprobe,
        "exact_scores": returns_exact_scores(index),
        "ntotal": int(index.ntotal),
        "dim": int(index.d),
        "metric": metric,
        "gpu": is_gpu_index(index),
    }


# -- search ---------------------------------------------------------------------------------
def check_search(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int | None) -> np.ndarray:
    """The arguments of a top-k search, checked: ``queries`` as a (q, d) array (a 1-D vector is one
    query), or InvalidParameter naming what is wrong with k, nprobe or the queries' shape."""
    if k < 1:
        raise InvalidParameter(f"Invalid k={k}: must be at least 1")
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != index.d:
        raise InvalidParameter(
            f"queries must have shape (q, {index.d}) for this index, got {np.shape(queries)}"
        )
    if nprobe is not None and int(nprobe) < 1:
        raise InvalidParameter(f"Invalid nprobe={nprobe}: must be at least 1")
    return q


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    nprobe: int | None = None,
    use_gpu: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product.

    Args:
        index: a FAISS index (CPU or GPU).
        queries: (q, dim) float16 / float32 / float64 (a 1-D vector is one query); converted to
            float32 at once, so pass large query sets in chunks.
        k: neighbours per query (at least 1; GPU indexes accept at most 2048).
        nprobe: IVF lists to visit for this call only (the index's own setting is left unchanged
            on the CPU; a GPU index keeps it). Ignored for indexes without lists.
        use_gpu: copy a CPU index to the GPU for this call (costly for large indexes: prefer
            ``to_gpu`` once).

    Returns:
        ``(scores, ids)``: float32 and int64 arrays of shape (q, k), best first. When fewer than k
        vectors are found (k > ntotal, or an IVF probe whose lists hold fewer than k vectors) the
        missing slots, always at the end of a row, have id ``-1`` and score ``-inf`` (so that
        ``exp(a * score)`` is 0 and ``ids >= 0`` masks them). Scores are exact inner products
        only when ``returns_exact_scores(index)``.
    """
    q = _as_f32(check_search(index, queries, k, nprobe))
    if use_gpu:
        index = to_gpu(index)
    ivf = _ivf(index)
    # FAISS parallelises an IVF search over the queries; with fewer queries than threads (a
    # prompt), over the probed lists instead (2 cores: ~1.4x faster for one query at 1M).
    mode = ivf.parallel_mode if ivf is not None else None
    if ivf is not None and q.shape[0] < faiss.omp_get_max_threads():
        ivf.parallel_mode = 1
    try:
        if nprobe is not None and ivf is not None:
            params = faiss.SearchParametersIVF(nprobe=min(int(nprobe), ivf.nlist))
            scores, ids = index.search(q, k, params=params)
        else:
            if nprobe is not None:
                set_nprobe(index, nprobe)
            scores, ids = index.search(q, k)
    finally:
        if ivf is not None:
            ivf.parallel_mode = mode
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    scores[ids < 0] = -np.inf
    return scores, ids

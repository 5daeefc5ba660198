"""Importance weights for a domain prompt, and domain-weighted samples (SPEC 8).

For a prompt t encoded with the index's own model, every IMAGE x of the pool gets
``w(x) = exp(a' <v_x, v_t>)`` (normalised vectors; ``a'`` defaults to 10, the paper's choice, not the
model's ~100). Everything is computed in log space: ``log w = a' cos``;
``normalized_weight = w / mean(w) = exp(log w - logmeanexp(log w))``; the effective sample size
``ESS = (sum w)^2 / sum w^2 = exp(2 LSE(log w) - LSE(2 log w))``. ``weight`` itself is stored as
``exp(log w)`` (it overflows to infinity only for ``a' cos > 709``; the normalised weights never do).

The prompt is encoded by ``queries.prompts.encode_prompt`` (the synthetic world's encoder, the
index's open_clip model, or a given ``.npy`` embedding).

Sampling (``sample``): ``mode="top"`` retrieves the highest-weight images through FAISS top-k on the
image index (the weight is monotone in the cosine), probing a quarter of the IVF lists by default
(``exact=True``: all of them) and rescoring the candidates exactly from the stored embeddings; ``mode="draw"`` draws with probability
proportional to the weights, seeded: without replacement by the Gumbel-top-k trick on ``log w``
(equivalent to drawing one at a time proportionally to w and removing each draw), with replacement
by ``Generator.choice`` with ``p = w / sum w``.

``engine="ray"`` (``--engine ray [--address ADDR]``) computes the same things over a partitioned
pool, as tasks on a Ray cluster (``queries.weights_engine``): the same weights (their normalisation
merged from per-partition partials), the exact top n, and the same seeded draws.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from clip_density_index.indexer import defaults, lock
from clip_density_index.indexer.errors import BadInput, DiskFull, InvalidParameter, ParameterClash
from clip_density_index.indexer.pool import as_pool
from clip_density_index.indexer.validate import check_seed
from clip_density_index.queries.formats import format_for, write_result
from clip_density_index.queries.outfile import check_out
from clip_density_index.queries.prompts import encode_prompt

log = logging.getLogger(__name__)

#: a', the paper's lowered logit scale for importance weights.
DEFAULT_LOGIT_SCALE = defaults.PROMPT_LOGIT_SCALE
#: Rows of embeddings converted to float64 at a time.
DEFAULT_CHUNK = 65536
#: Seconds ``weights`` waits for another process to let go of the catalog before it writes.
CATALOG_WAIT = 30.0
SAMPLE_MODES = ("draw", "top")
#: Output suffixes of ``weights --out`` and ``sample --out``.
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson", ".json")

# Memory of ``sample`` (checked before anything is drawn: unchecked, ``sample -n 50000000 --replace``
# is killed by the kernel after 24 GB). Measured on a 2,000-sample index, 1-2M rows drawn with replacement,
# uid + caption 62 bytes a row: 196-225 B/row returned or written to parquet, 949 B/row to CSV,
# 1,902 B/row more to print the table.
#: Bytes per drawn row, plus 1.5x its uid and caption: ids, cosines, weights, lookup positions, strings.
SAMPLE_ROW_BYTES = 160
#: Extra bytes per row written to CSV / JSON lines (rows become Python objects, then text), plus 4x
#: the row's text.
TEXT_OUT_ROW_BYTES = 750
#: Extra bytes per row printed as a table (the CLI without --out), plus 4x the row's text.
PRINT_ROW_BYTES = 1650
#: Bytes per sample of the pool: its cosines, log weights, weights, normalised weights, probabilities.
POOL_ROW_BYTES = 64
#: Below this many rows ``sample`` skips the memory check (at most a few hundred MB).
SAMPLE_CHECK_MIN = 100_000



# -- weights ------------------------------------------------------------------------------------
def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    if not math.isfinite(m):
        return m
    return m + math.log(float(np.sum(np.exp(x - m))))


def check_logit_scale(a: float) -> float:
    """Return ``a`` if it is a finite positive number.

    Raises:
        InvalidParameter: otherwise.
    """
    try:
        f = float(a)
    except (TypeError, ValueError):
        raise InvalidParameter.naming("{logit_scale} must be a positive number, got {value!r}", value=a) from None
    if not (math.isfinite(f) and f > 0):
        raise InvalidParameter.naming("{logit_scale} must be a positive number, got {value!r}", value=a)
    return f


def image_cosines(index, vector: np.ndarray, chunk: int = DEFAULT_CHUNK, lo: int = 0,
                  hi: int | None = None) -> np.ndarray:
    """``<v_x, v_t>`` for every image x of the pool (float64, chunked over the memory map), or for
    the images ``lo:hi`` (vec_ids) of a partition.

    A cosine that two unit vectors cannot have (NaN, |cos| > 1: a damaged embedding row, such as
    a NaN or 1e30) is refused, naming the file and row; checked on the result instead of a second
    pass over the file (``PoolIndex.embeddings(checked=True)``), which would double the time."""
    pool = as_pool(index)
    emb = pool.embeddings("image", checked=False)
    hi = emb.shape[0] if hi is None else hi
    v = np.asarray(vector, dtype=np.float64)
    out = np.empty(hi - lo, dtype=np.float64)
    for s in range(lo, hi, chunk):
        out[s - lo : min(s + chunk, hi) - lo] = np.asarray(emb[s : min(s + chunk, hi)], dtype=np.float64) @ v
    bad = ~(np.abs(out) <= 1.0 + 1e-2 * max(1.0, float(np.linalg.norm(v))))
    if bad.any():
        row = lo + int(np.flatnonzero(bad)[0])
        pool.unit_rows("image", np.array([row]))  # raises BrokenIndex naming image_emb.npy and the row
        raise BadInput(f"image row {row}: cosine {out[row - lo]:.6g} with the prompt, not in [-1, 1]")
    return out


@dataclass
class Weights:
    """Importance weights of every image of the pool for one prompt.

    Attributes:
        prompt: the label (prompt text or ``embedding:<file>``).
        logit_scale: a'.
        cosine: (n,) ``<v_x, v_t>`` by ``vec_id``.
        log_weight: (n,) ``a' * cosine``.
        encoder: how the prompt was encoded.
        out: file the weights were exported to, or None.
    """

    prompt: str
    logit_scale: float
    cosine: np.ndarray
    log_weight: np.ndarray
    encoder: str = ""
    out: Path | None = None
    stored: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return int(self.log_weight.shape[0])

    @property
    def log_mean(self) -> float:
        """``log mean(w)``, computed stably."""
        if "log_mean" not in self._cache:
            self._cache["log_mean"] = _logsumexp(self.log_weight) - math.log(self.n)
        return self._cache["log_mean"]

    @property
    def weight(self) -> np.ndarray:
        """``w = exp(a' cos)`` (inf where ``a' cos > 709``)."""
        with np.errstate(over="ignore"):
            return np.exp(self.log_weight)

    @property
    def normalized_weight(self) -> np.ndarray:
        """``w / mean(w)``; sums to n."""
        return np.exp(self.log_weight - self.log_mean)

    @property
    def ess(self) -> float:
        """Effective sample size ``(sum w)^2 / sum w^2``, from log space."""
        if "ess" not in self._cache:
            self._cache["ess"] = math.exp(2 * _logsumexp(self.log_weight) - _logsumexp(2 * self.log_weight))
        return self._cache["ess"]

    @property
    def ess_fraction(self) -> float:
        return self.ess / self.n

    def summary(self) -> dict[str, float]:
        """``n, ess, ess_fraction`` and ``min / median / max`` of the normalised weights, and
        ``top1_share``: the share of the total weight held by the top ``ceil(n / 100)`` samples."""
        nw = self.normalized_weight
        k = max(1, math.ceil(self.n / 100))
        top = np.partition(nw, self.n - k)[self.n - k :]
        return {
            "n": self.n, "logit_scale": self.logit_scale, "ess": self.ess, "ess_fraction": self.ess_fraction,
            "min": float(nw.min()), "median": float(np.median(nw)), "max": float(nw.max()),
            "top1_share": float(top.sum() / nw.sum()),
        }


def compute_weights(
    index,
    prompt: str | None = None,
    prompt_embedding: str | Path | np.ndarray | None = None,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    device: str = "auto",
    model: str | None = None,
    pretrained: str | None = None,
    *,
    engine: str | Any = "local",
    address: str | None = None,
    partition_rows: int | None = None,
) -> Weights:
    """Importance weights of every image for a prompt (not stored; see ``weights``).

    Args:
        index: index directory or URI, or an opened ``PoolIndex``.
        prompt: the prompt text (encoded with the index's model), or the label of ``prompt_embedding``.
        prompt_embedding: the prompt's text embedding (``.npy`` file or array).
        logit_scale: a' (default 10).
        device: torch device for open_clip models.
        model, pretrained: open_clip model / weights for the prompt instead of the manifest's.
        engine: ``"local"`` (this process, one pass), ``"ray"`` (tasks on a Ray cluster over
            partitions of the pool; the index on a path every node reads, or a URI each node
            mirrors), or an engine already open (``indexer.engine.open_engine``), which runs the
            partitions' tasks.
        address: ``engine="ray"``: the cluster (``auto``, ``HOST:PORT``, ``ray://...``); default
            a local one of this machine's CPUs, for this call.
        partition_rows: ``engine="ray"``: images per partition (default: see
            ``weights_engine.partitions``).

    Returns:
        ``Weights``.

    Raises:
        InvalidParameter, BadInput: see ``encode_prompt``; a non-positive ``logit_scale``.
    """
    from clip_density_index.queries import weights_engine

    a = check_logit_scale(logit_scale)
    pool = as_pool(index)
    with weights_engine.opened(engine, address) as eng:
        p = encode_prompt(pool, prompt, prompt_embedding, device=device, model=model, pretrained=pretrained)
        if eng is None:
            cos = image_cosines(pool, p.vector)
            return Weights(p.label, a, cos, a * cos, p.encoder)
        cos, sums = weights_engine.cosines(eng, pool, p.vector, a, partition_rows)
        return Weights(p.label, a, cos, a * cos, p.encoder, _cache={"log_mean": sums.log_mean, "ess": sums.ess})


def _out_suffix(out: str | Path) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise InvalidParameter(
            f"Output {str(out)!r}: unknown suffix; use one of .parquet, .csv, .jsonl"
        )
    return suffix


def weights(
    index,
    prompt: str | None = None,
    prompt_embedding: str | Path | np.ndarray | None = None,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    *,
    out: str | Path | None = None,
    force: bool = False,
    store: bool = True,
    device: str = "auto",
    model: str | None = None,
    pretrained: str | None = None,
    engine: str | Any = "local",
    address: str | None = None,
    partition_rows: int | None = None,
) -> Weights:
    """Compute importance weights for a prompt, store them in the ``weights`` table, export them.

    The ``weights`` table (SPEC 11) gets one row per sample: ``prompt, uid, vec_id, logit_scale,
    cosine, log_weight, weight, normalized_weight``; earlier rows of the same prompt are replaced.

    Args:
        index: index directory or URI, or an opened ``PoolIndex``.
        prompt: the prompt text, e.g. "a photo of food" (or the label of ``prompt_embedding``).
        prompt_embedding: the prompt's text embedding (``.npy`` file or array).
        logit_scale: a' (default 10).
        out: also export ``uid, weight, normalized_weight`` to this ``.parquet`` / ``.csv`` /
            ``.jsonl`` file.
        force: overwrite an existing ``out``.
        store: write the ``weights`` table (False: compute and export only).
        device: torch device for open_clip models.
        model, pretrained: open_clip model / weights for the prompt instead of the manifest's.
        engine, address, partition_rows: where the weights are computed (see ``compute_weights``);
            this process stores and exports them either way.

    Returns:
        ``Weights`` (see its ``ess`` and ``summary()``).

    Raises:
        InvalidParameter: bad prompt / logit scale / output, or ``out`` exists without ``force``.
        BadInput: a bad embedding file, or the catalog cannot be written (e.g. in use).
    """
    if out is not None:
        _out_suffix(out)
        check_out(out, force)
    pool = as_pool(index)
    w = compute_weights(pool, prompt, prompt_embedding, logit_scale, device=device, model=model,
                        pretrained=pretrained, engine=engine, address=address, partition_rows=partition_rows)
    if store:
        store_weights(pool, w)
    if out is not None:
        try:
            write_weights(pool, w, out, force=force)
        except DiskFull as e:  # say what did happen: the table is written
            if not w.stored:
                raise
            raise DiskFull(f"{e}; the weights themselves were stored (table weights of {str(pool.root)!r})") from None
    return w


def store_weights(index, w: Weights) -> None:
    """Replace the rows of ``w.prompt`` in the ``weights`` table by ``w`` (one transaction)."""
    pool = as_pool(index)
    rows = {"vec_id": np.arange(w.n, dtype=np.int64), "cosine": w.cosine, "log_weight": w.log_weight,
            "weight": w.weight, "normalized_weight": w.normalized_weight}
    with lock.using(pool.root, "weights"), pool.store(read_only=False, wait=CATALOG_WAIT) as s:
        with s.errors(f"Writing the weights into {str(pool.paths.catalog)!r}", BadInput):
            s.run("weights_create")
            with s.transaction():
                s.run("weights_delete", prompt=w.prompt)
                s.insert("weights_insert", {"_weights": rows}, prompt=w.prompt, logit_scale=w.logit_scale)
        w.stored = True  # committed: in the catalog's write-ahead log, durable
        problem = s.checkpoint()
        if problem:  # e.g. a full disk: the WAL keeps the change, replayed on open
            log.warning("the weights are stored, but the catalog %s could not be checkpointed (%s); they stay "
                        "in its write-ahead log until a later write succeeds", pool.paths.catalog, problem)


def write_weights(index, w: Weights, out: str | Path, force: bool = False) -> Path:
    """Export ``uid, weight, normalized_weight`` (by ``vec_id`` order) to parquet / CSV / JSON lines."""
    pool = as_pool(index)
    _out_suffix(out)
    with pool.store(read_only=True) as s:
        uids = s.arrow("samples_uids").column("uid")
    table = pa.table({"uid": uids, "weight": w.weight, "normalized_weight": w.normalized_weight})
    write_result(table, format_for(out, None), out, force=force)
    w.out = Path(out)
    return Path(out)


# -- sampling -----------------------------------------------------------------------------------
def _hnsw_ef(index: Any, k: int) -> None:
    """Raise an HNSW index's efSearch to at least k (no-op for other indexes)."""
    import faiss

    sub = faiss.downcast_index(index)
    while hasattr(sub, "index") and not hasattr(sub, "hnsw"):
        sub = faiss.downcast_index(sub.index)
    if hasattr(sub, "hnsw"):
        sub.hnsw.efSearch = max(int(sub.hnsw.efSearch), int(k))


#: Default share of the IVF lists ``sample --mode top`` probes: a quarter (1M synthetic pool,
#: IVF4096: recall of the exact top-100 0.999 at ~20-30 ms, against ~80-110 ms for every list).
TOP_PROBE_FRACTION = 4


def default_top_nprobe(nlist: int | None) -> int | None:
    """IVF lists ``sample --mode top`` probes by default: ``ceil(nlist / 4)`` (None: no lists)."""
    return None if not nlist else max(1, -(-int(nlist) // TOP_PROBE_FRACTION))


def top_by_faiss(index, vector: np.ndarray, n: int, nprobe: int | None = None,
                 exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` images with the highest cosine to ``vector``, through the FAISS image index.

    IVF indexes probe ``default_top_nprobe(nlist)`` lists (a quarter) unless ``nprobe`` is given.
    When the probed lists hold fewer than ``n`` images, twice as many are probed until they do (or
    all are). ``exact=True`` skips FAISS: every image's cosine from the stored embeddings (O(n d),
    the exact top n whatever the index type; PQ codes can miss true neighbours before rescoring). Measured recall of
    the exact top-100 on the 1M synthetic world (IVF4096, 60 prompts): nprobe 256: 0.963, 512:
    0.991, 1024 (the default): 0.999, 2048: 0.9998. A margin of extra candidates is fetched, and
    candidates are rescored exactly (float64) from the stored embeddings, so approximate codes
    (PQ, SQ) do not reorder the candidates found; ties are broken by ``vec_id``.

    Returns:
        ``(vec_ids, cosines)``, best first.
    """
    from clip_density_index.indexer import faiss_index

    pool = as_pool(index)
    if exact and nprobe is not None:
        raise InvalidParameter("Give either nprobe or exact, not both")
    if exact:
        return top_rows(image_cosines(pool, vector), n)
    fx = pool.faiss("image")
    scores_exact = faiss_index.returns_exact_scores(fx)
    margin = max(16, n // 10) if scores_exact else max(64, 3 * n)
    k = min(pool.n, n + margin)
    params = (pool.manifest.get("index_params") or {}).get("image") or {}
    nlist = params.get("nlist")
    _hnsw_ef(fx, k)
    if nprobe is not None and nprobe < 1:
        raise InvalidParameter(f"nprobe must be >= 1, got {nprobe}")
    probe = nprobe if nprobe is not None else default_top_nprobe(nlist)
    query = np.asarray(vector, dtype=np.float32)[None, :]
    while True:
        _, ids = faiss_index.search(fx, query, k, nprobe=probe)
        ids = ids[0][ids[0] >= 0]
        if len(ids) >= min(n, pool.n) or not probe or not nlist or probe >= int(nlist):
            break
        # the probed lists hold fewer than n images: probe twice as many, up to all of them
        log.info("nprobe %d found %d of the %d images asked for; probing %d lists", probe, len(ids), n,
                 min(2 * probe, int(nlist)))
        probe = min(2 * probe, int(nlist))
    ids = np.unique(ids)  # sorted: memory-map friendly
    # only these rows are read, and checked (a damaged row is refused; no pass over the whole file)
    cos = pool.unit_rows("image", ids) @ np.asarray(vector, dtype=np.float64)
    order = np.lexsort((ids, -cos))[:n]
    return ids[order], cos[order]


def top_rows(cos: np.ndarray, n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` highest of ``cos`` (the cosines of vec_ids ``offset, offset + 1, ...``), best first,
    ties broken by vec_id: ``(vec_ids, cosines)``. The top n of a pool is the top n of the union of
    its partitions' top n, ordered the same way."""
    n_top = min(n, cos.shape[0])
    ids = np.argpartition(-cos, n_top - 1)[:n_top] if n_top < cos.shape[0] else np.arange(cos.shape[0])
    # ties at the boundary: every image whose cosine equals the n-th best competes by vec_id
    cut = cos[ids].min()
    ids = np.flatnonzero(cos >= cut)
    order = np.lexsort((ids, -cos[ids]))[:n_top]
    return ids[order] + offset, cos[ids[order]]


#: Up to this many distinct vec_ids, captions are fetched by index point lookups; beyond, by a join.
LOOKUP_MAX = 2048


def lookup_samples(index, vec_ids: np.ndarray) -> pa.Table:
    """``vec_id, uid, caption`` of the given vec_ids, in their order (repeats allowed).

    Uses the index's kept read-only connection (``PoolIndex.reader``) and, for up to
    ``LOOKUP_MAX`` distinct ids, point lookups through the ``samples_vec_id`` index.
    """
    pool = as_pool(index)
    vec_ids = np.asarray(vec_ids, dtype=np.int64)
    uniq = np.unique(vec_ids)
    with pool.reader().cursor() as s:
        if len(uniq) <= LOOKUP_MAX:
            found = s.arrow_in("samples_by_vec_id", uniq.tolist())
        else:
            with s.registered(_ids={"vec_id": uniq}):
                found = s.arrow("samples_by_vec_id_join")
    got = found.column("vec_id").to_numpy()
    if len(got) != len(uniq):
        raise BadInput(f"Catalog {str(pool.paths.catalog)!r} lacks samples rows for some vec_ids")
    order = np.argsort(got, kind="stable")
    pos = order[np.minimum(np.searchsorted(got[order], vec_ids), max(len(got) - 1, 0))]
    if not np.array_equal(got[pos], vec_ids):
        raise BadInput(f"Catalog {str(pool.paths.catalog)!r} lacks samples rows for some vec_ids")
    return found.take(pa.array(pos))


def gumbel_top_k(log_w: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` draws without replacement with probability proportional to ``exp(log_w)``
    (in draw order): the top n of ``log_w + Gumbel noise``."""
    keys = log_w + rng.gumbel(size=log_w.shape[0])
    if n < keys.shape[0]:
        part = np.argpartition(-keys, n - 1)[:n]
    else:
        part = np.arange(keys.shape[0])
    return part[np.argsort(-keys[part], kind="stable")]


def gumbel_noise(seed: int, lo: int, hi: int) -> np.ndarray:
    """The Gumbel noise of vec_ids ``lo:hi`` in the draw of ``seed``: entries ``lo:hi`` of
    ``default_rng(seed).gumbel(size=n)``, the noise ``sample`` adds to the log weights, without
    drawing the ones before. Each Gumbel value takes one 64-bit output of the PCG64 stream, so the
    stream is advanced by ``lo`` (a jump, O(log lo)). So a partition's noise depends only on
    ``(seed, vec_id)``, and a partitioned draw is the same draw. (numpy redraws a uniform that is
    exactly 0, probability 2^-53 per value; after such a redraw the stream would shift by one.)"""
    bits = np.random.PCG64(seed)
    bits.advance(int(lo))
    return np.random.Generator(bits).gumbel(size=int(hi) - int(lo))


def sample_bytes(n: int, pool_n: int, text_bytes: float, out_format: str | None = None,
                 printed: bool = False) -> int:
    """Predicted peak memory of ``sample`` drawing ``n`` rows from a pool of ``pool_n`` samples whose
    uid + caption take ``text_bytes`` on average; ``out_format`` of the ``--out`` file (None: none),
    ``printed``: every row is printed as a table.

    >>> round(sample_bytes(50_000_000, 100_000, 62) / 2**30, 1)  # 50M rows drawn, to parquet
    11.8
    """
    per_row = SAMPLE_ROW_BYTES + 1.5 * text_bytes
    if out_format in ("csv", "jsonl"):
        per_row += TEXT_OUT_ROW_BYTES + 4 * text_bytes
    if printed:
        per_row += PRINT_ROW_BYTES + 4 * text_bytes
    return int(n * per_row + pool_n * POOL_ROW_BYTES)


def check_sample_memory(pool, n: int, out: str | Path | None = None, printed: bool = False,
                        what: str | None = None, pool_rows: int | None = None) -> None:
    """Refuse ``sample`` of ``n`` rows before anything is drawn when it would not fit in memory;
    ``pool_rows``: the rows of the pool this process holds (default all of them; ``engine="ray"``:
    only the partitions' candidates).

    Raises:
        TooMuchMemory: naming the rows, the bytes needed and the bytes available.
    """
    from clip_density_index.indexer import memory

    if n < SAMPLE_CHECK_MIN:
        return
    with pool.reader().cursor() as s:
        text_bytes = float(s.value("samples_text_bytes"))
    fmt = None if out is None else format_for(out, None)
    need = sample_bytes(n, pool.n if pool_rows is None else pool_rows, text_bytes, fmt, printed)
    hint = ("write the rows to a file with --out FILE.parquet instead of printing them" if printed else
            "write .parquet instead" if fmt in ("csv", "jsonl") else "ask for fewer rows")
    memory.check(need, what or f"sample -n {n:,}", hint)


def sample(
    index,
    prompt: str | None = None,
    prompt_embedding: str | Path | np.ndarray | None = None,
    n: int = 100,
    *,
    mode: str = "draw",
    seed: int = 0,
    replace: bool = False,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    out: str | Path | None = None,
    force: bool = False,
    device: str = "auto",
    nprobe: int | None = None,
    exact: bool = False,
    printed: bool = False,
    model: str | None = None,
    pretrained: str | None = None,
    engine: str | Any = "local",
    address: str | None = None,
    partition_rows: int | None = None,
) -> pa.Table:
    """Domain-weighted samples of the pool for a prompt.

    Args:
        index: index directory or URI, or an opened ``PoolIndex``.
        prompt: the prompt text (or the label of ``prompt_embedding``).
        prompt_embedding: the prompt's text embedding (``.npy`` file or array).
        n: how many samples (rows).
        mode: "draw" (random, probability proportional to the weights) or "top" (highest weights).
        seed: seed of the draw (``mode="draw"``); the same seed gives the same draw.
        replace: draw with replacement (``mode="draw"``); default without.
        logit_scale: a' (default 10).
        out: also write the rows to a ``.parquet`` / ``.csv`` / ``.jsonl`` file.
        force: overwrite an existing ``out``.
        device: torch device for open_clip models.
        nprobe: ``mode="top"``: IVF lists to probe (default: a quarter of them, see ``top_by_faiss``).
        exact: ``mode="top"``: probe every IVF list (the exact top n of an IVF-Flat index).
        printed: the caller prints every row (the CLI without ``--out``): counted in the memory check.
        model, pretrained: open_clip model / weights for the prompt instead of the manifest's.
        engine, address, partition_rows: where the pool's partitions are read (see
            ``compute_weights``). ``engine="ray"`` gives the same draw for the same seed; its
            ``mode="top"`` is the exact top n (``exact=True``): every partition is scanned, no FAISS.

    Returns:
        A table in draw (or rank) order: ``rank, vec_id, uid, caption, cosine, weight`` and, for
        ``mode="draw"``, ``normalized_weight`` (w / mean w over the pool; "top" skips the pass over
        the whole pool that it needs).

    Raises:
        InvalidParameter: bad mode, n < 1, n larger than the pool (except drawing with
            replacement), bad prompt or logit scale, ``out`` exists without ``force``.
        TooMuchMemory: the n rows would not fit in the available memory (checked before drawing).
    """
    from clip_density_index.queries import weights_engine

    _check_sample_args(mode, n, replace, nprobe, exact)
    a = check_logit_scale(logit_scale)
    seed = check_seed(seed)
    if out is not None:
        _out_suffix(out)
        check_out(out, force)
    pool = as_pool(index)
    if n > pool.n and not (mode == "draw" and replace):
        raise InvalidParameter.naming(
            "{n} {value} is larger than the pool ({size} samples); "
            + ("use {replace} to draw with replacement" if mode == "draw" else "ask for at most the pool size"),
            value=n, size=pool.n)
    partitioned = not (isinstance(engine, str) and engine == "local")
    if partitioned and nprobe is not None:
        raise ParameterClash.naming("{nprobe} applies to the FAISS search of {engine} local; {engine} {value} "
                                    "finds the exact top n, scanning every partition",
                                    value=engine if isinstance(engine, str) else engine.name)
    with weights_engine.opened(engine, address) as eng:
        held = None if eng is None else weights_engine.held_rows(eng, pool.n, n, mode, replace, partition_rows)
        check_sample_memory(pool, int(n), out, printed,
                            f"sample -n {int(n):,}" + (" --replace" if replace else "") + (f" --out {out}" if out else ""),
                            pool_rows=held)
        p = encode_prompt(pool, prompt, prompt_embedding, device=device, model=model, pretrained=pretrained)
        if eng is not None:
            cols = weights_engine.sample_columns(eng, pool, p.vector, a, n, mode=mode, seed=seed, replace=replace,
                                                 partition_rows=partition_rows)
        elif mode == "top":
            cols = _top_columns(pool, p.vector, n, a, nprobe, exact)
        else:
            cos = image_cosines(pool, p.vector)
            cols = _draw_columns(Weights(p.label, a, cos, a * cos, p.encoder), n, replace, seed)
    table = _sample_table(pool, cols)
    if out is not None:
        write_result(table, format_for(out, None), out, force=force)
    return table


def _check_sample_args(mode: str, n: Any, replace: bool, nprobe: int | None, exact: bool) -> None:
    """The mode and its options, and ``n``, before anything is read."""
    if mode not in SAMPLE_MODES:
        raise InvalidParameter(f"Unknown sample mode {mode!r}; choose one of {', '.join(SAMPLE_MODES)}")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise InvalidParameter.naming("{n} must be a positive integer, got {value!r}", value=n)
    if mode == "top" and replace:
        raise InvalidParameter.naming("{replace} only applies to {mode} draw")
    if mode == "draw" and (nprobe is not None or exact):
        raise InvalidParameter("--nprobe and --exact only apply to --mode top")


def _top_columns(pool, vector: np.ndarray, n: int, a: float, nprobe: int | None, exact: bool) -> dict[str, np.ndarray]:
    """``mode="top"``: the ``n`` highest-weight images (``top_by_faiss``), best first."""
    ids, cos = top_by_faiss(pool, vector, n, nprobe=nprobe, exact=exact)
    with np.errstate(over="ignore"):
        return {"vec_id": ids, "cosine": cos, "weight": np.exp(a * cos)}


def _draw_columns(w: Weights, n: int, replace: bool, seed: int) -> dict[str, np.ndarray]:
    """``mode="draw"``: ``n`` images drawn with probability proportional to the weights, seeded;
    with replacement by ``Generator.choice``, without by the Gumbel-top-k trick."""
    rng = np.random.default_rng(seed)
    if replace:
        prob = w.normalized_weight / w.n
        ids = rng.choice(w.n, size=n, replace=True, p=prob / prob.sum())
    else:
        ids = gumbel_top_k(w.log_weight, n, rng)
    return {"vec_id": ids.astype(np.int64), "cosine": w.cosine[ids], "weight": w.weight[ids],
            "normalized_weight": w.normalized_weight[ids]}


def _sample_table(pool, cols: dict[str, np.ndarray]) -> pa.Table:
    """``rank, vec_id, uid, caption`` and the other columns, in the order of ``cols["vec_id"]``."""
    rows = lookup_samples(pool, cols["vec_id"])
    return pa.table({
        "rank": np.arange(1, len(cols["vec_id"]) + 1, dtype=np.int64),
        "vec_id": np.asarray(cols["vec_id"], dtype=np.int64), "uid": rows.column("uid"),
        "caption": rows.column("caption"),
        **{k: np.asarray(v) for k, v in cols.items() if k != "vec_id"},
    })

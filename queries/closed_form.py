"""Closed-form per-sample scores (SPEC sections 4-7): no neighbour search, O(n d) overall.

Two layers:

* Pure array functions (``dc``, ``dw``, ``rawnorm``, ``conformity``, ``conformity_est``,
  ``loglik``, ``clipscore``). They take one chunk of rows (float16, float32 or float64), compute in
  float64 and return float64 arrays of shape ``(rows,)``. Every one is row-wise, so running it over
  chunks and concatenating gives the same result as running it over the whole array.
* Pool drivers (``closed_form_scores``, ``clipscore_scores``). They stream the memory-mapped
  embeddings of a ``PoolIndex`` chunk by chunk and write one (n,) float64 array per score column,
  named as in SPEC 11 (``dc_text``, ``loglik_image``, ``clipscore``, ...), chunk by chunk: arrays in
  memory, or the arrays a ``column`` hook gives (``score``: its column files, ``queries.columns``).

The statistics come from the catalog (``PoolIndex.stat``, written by ``indexer.stats``): ``mean`` and
``sum`` (of the normalised vectors), ``cov`` (normalised vectors, ddof=1), and ``whiten_mean``,
``whiten`` (W = S^-1/2), ``whiten_logdet`` (log|det W|), computed on the raw vectors when those are
known, else on the normalised ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from clip_density_index.indexer.errors import BadInput, InvalidParameter
from clip_density_index.indexer.layout import MODALITIES, check_modality
from clip_density_index.indexer.progress import Progress, null_progress
from clip_density_index.indexer.stats import matmul, whitened_loglik

__all__ = [
    "METRICS",
    "DEFAULT_CHUNK",
    "dc",
    "dw",
    "rawnorm",
    "conformity",
    "conformity_est",
    "loglik",
    "clipscore",
    "closed_form_scores",
    "clipscore_scores",
]

#: The per-modality closed-form metrics ``closed_form_scores`` can compute; the score column is
#: ``f"{metric}_{modality}"``.
METRICS: frozenset[str] = frozenset({"dc", "dw", "rawnorm", "conformity", "conformity_est", "loglik"})

#: Rows per chunk. A chunk is converted to float64: 65536 rows x 768 dims is 400 MB per temporary.
DEFAULT_CHUNK = 65536

CLIPSCORE_WEIGHT = 2.5


class _Pool(Protocol):
    """The part of ``indexer.pool.PoolIndex`` this module reads."""

    n: int
    logit_scale: float

    def embeddings(self, modality: str) -> np.ndarray: ...

    def raw_norms(self, modality: str) -> np.ndarray | None: ...

    def stat(self, modality: str, name: str) -> np.ndarray: ...


# -- pure array functions -------------------------------------------------------------------------


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _rows(x: Any, name: str) -> np.ndarray:
    x = _f64(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array of rows, got shape {x.shape}")
    return x


def _rowdot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise inner products of two (rows, d) arrays."""
    return np.einsum("ij,ij->i", x, y)


def dc(v: np.ndarray, vbar: np.ndarray, a: float) -> np.ndarray:
    """Centred distance ``D_C = a^2 ||v - vbar||^2`` (SPEC 4).

    Args:
        v: (rows, d) normalised embeddings of one modality.
        vbar: (d,) mean of the normalised embeddings of the same modality.
        a: logit scale (about 100 for CLIP).

    Returns:
        (rows,) float64.
    """
    diff = _rows(v, "v") - _f64(vbar)
    return float(a) ** 2 * _rowdot(diff, diff)


def dw(v: np.ndarray, vbar: np.ndarray, G: np.ndarray, a: float, precision: str = "float64") -> np.ndarray:
    """Whitened-by-the-other-modality distance ``D_W = a^2 (v - vbar)^T G (v - vbar)`` (SPEC 4).

    Computed as ``((v - vbar) @ G * (v - vbar)).sum(1)``: one (rows, d) x (d, d) product, never a
    d x d matrix per row. Scaling ``G`` by a constant scales every score alike and changes no ranking.

    Args:
        v: (rows, d) normalised embeddings of one modality.
        vbar: (d,) mean of the normalised embeddings of the same modality.
        G: (d, d) covariance (ddof=1) of the normalised embeddings of the other modality.
        a: logit scale.
        precision: type of the (rows, d) x (d, d) product (see ``indexer.stats.matmul``).

    Returns:
        (rows,) float64.
    """
    diff = _rows(v, "v") - _f64(vbar)
    return float(a) ** 2 * np.einsum("ij,ij->i", matmul(diff, G, precision), diff, dtype=np.float64)


def rawnorm(norms: np.ndarray, a: float) -> np.ndarray:
    """Raw-norm score ``a^2 ||u||^2`` (SPEC 4).

    Args:
        norms: (rows,) norms ``||u||`` of the raw (unnormalised) embeddings.
        a: logit scale.

    Returns:
        (rows,) float64 (NaN stays NaN).
    """
    norms = _f64(norms)
    return float(a) ** 2 * norms * norms


def conformity(v: np.ndarray, sum_vec: np.ndarray, n: int) -> np.ndarray:
    """Exact conformity ``C(v_j) = mean_{k != j} cos(v_j, v_k)`` in O(d) per row (SPEC 5).

    Uses ``C(v_j) = (<v_j, sum_k v_k> - 1) / (n - 1)``, which holds when

    * every vector is unit-norm (so ``cos`` is the inner product and ``<v_j, v_j> = 1``), and
    * ``v_j`` is itself one of the ``n`` vectors summed in ``sum_vec`` (the ``- 1`` removes its
      similarity to itself).

    For vectors stored in float16 the unit norm holds to about 1e-3, which bounds the error.

    Args:
        v: (rows, d) normalised embeddings, each a member of the summed set.
        sum_vec: (d,) sum of all ``n`` normalised embeddings of the modality.
        n: number of vectors in the sum.

    Returns:
        (rows,) float64; all NaN when ``n < 2`` (the mean over no other sample is undefined).
    """
    v = _rows(v, "v")
    if n < 2:
        return np.full(v.shape[0], np.nan)
    return (v @ _f64(sum_vec) - 1.0) / (n - 1)


def conformity_est(v: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Estimated conformity ``C_hat(v) = cos(m, v)`` with ``m`` the modality mean (SPEC 5).

    The paper's affine fit ``a cos + b`` is left out: it changes neither rankings nor correlations.

    Args:
        v: (rows, d) embeddings (need not be exactly unit-norm; the cosine divides by the norms).
        mean: (d,) mean of the normalised embeddings of the modality.

    Returns:
        (rows,) float64 in [-1, 1].
    """
    v = _rows(v, "v")
    m = _f64(mean)
    denom = np.sqrt(_rowdot(v, v)) * np.linalg.norm(m)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (v @ m) / denom


def loglik(u: np.ndarray, mu: np.ndarray, W: np.ndarray, logdet: float, precision: str = "float64") -> np.ndarray:
    """Whitened Gaussian log-likelihood (SPEC 6); delegates to ``indexer.stats.whitened_loglik``.

    ``log p(u) = -||W (u - mu)||^2 / 2 - (d/2) log(2 pi) + log|det W|``. With ``W = S^-1/2`` (or any
    W with ``W^T W = S^-1``) this is exactly the log-density of N(mu, S) at ``u``.

    Args:
        u: (rows, d) embeddings: raw ones when the raw vectors are known, else normalised ones (the
            same space the whitening statistics were computed in).
        mu: (d,) mean used for whitening (stat ``whiten_mean``).
        W: (d, d) whitening matrix (stat ``whiten``).
        logdet: ``log|det W|`` (= -1/2 log det S; stat ``whiten_logdet``).
        precision: type of the product ``(u - mu) W^T`` (see ``indexer.stats.whitened_loglik``).

    Returns:
        (rows,) float64.

    Raises:
        InvalidParameter: shapes of u, mu and W disagree.
    """
    return whitened_loglik(_rows(u, "u"), mu, W, logdet, precision=precision)


def clipscore(v_img: np.ndarray, v_txt: np.ndarray) -> np.ndarray:
    """CLIPScore ``2.5 * max(cos(v_img, v_txt), 0)`` of each (image, caption) pair (SPEC 7).

    Args:
        v_img: (rows, d) image embeddings.
        v_txt: (rows, d) text embeddings of the same pairs, row for row.

    Returns:
        (rows,) float64 in [0, 2.5].
    """
    vi, vt = _rows(v_img, "v_img"), _rows(v_txt, "v_txt")
    if vi.shape != vt.shape:
        raise ValueError(f"v_img {vi.shape} and v_txt {vt.shape} must have the same shape")
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = _rowdot(vi, vt) / np.sqrt(_rowdot(vi, vi) * _rowdot(vt, vt))
    return CLIPSCORE_WEIGHT * np.maximum(cos, 0.0)


# -- pool drivers ---------------------------------------------------------------------------------


def _other(modality: str) -> str:
    return MODALITIES[1 - MODALITIES.index(check_modality(modality))]


def _check_chunk(chunk: int) -> int:
    if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 1:
        raise InvalidParameter(f"chunk must be a positive integer, got {chunk!r}")
    return int(chunk)


def _where(pool: Any) -> str:
    root = getattr(pool, "root", None)
    return f"Index {str(root)!r}" if root is not None else "The index"


def _stat(pool: _Pool, modality: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
    value = _f64(pool.stat(modality, name))
    if value.shape != shape:
        raise BadInput(
            f"{_where(pool)}: statistic {name!r} of {modality} has shape {value.shape}, "
            f"expected {shape}; rebuild the index"
        )
    if not np.all(np.isfinite(value)):
        raise BadInput(f"{_where(pool)}: statistic {name!r} of {modality} is not finite; rebuild the index")
    return value


def _scalar_stat(pool: _Pool, modality: str, name: str) -> float:
    value = _f64(pool.stat(modality, name))
    if value.size != 1 or not np.isfinite(value).all():
        raise BadInput(
            f"{_where(pool)}: statistic {name!r} of {modality} must be one finite number, "
            f"got shape {value.shape}; rebuild the index"
        )
    return float(value.reshape(()))


def _embeddings(pool: _Pool, modality: str) -> np.ndarray:
    emb = pool.embeddings(modality)
    if emb.ndim != 2 or emb.shape[0] != pool.n:
        raise BadInput(
            f"{_where(pool)}: {modality} embeddings have shape {emb.shape}, expected ({pool.n}, dim)"
        )
    return emb


def _raw_norms(pool: _Pool, modality: str) -> np.ndarray | None:
    norms = pool.raw_norms(modality)
    if norms is None:
        return None
    norms = np.asarray(norms)
    if norms.shape != (pool.n,):
        raise BadInput(
            f"{_where(pool)}: {modality} raw norms have shape {norms.shape}, expected ({pool.n},)"
        )
    return norms


def _chunks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


#: Makes the (n,) float64 array a score column is written into, given the column's name.
ColumnHook = Callable[[str], np.ndarray]


def _in_memory(n: int) -> ColumnHook:
    return lambda name: np.empty(n, dtype=np.float64)


def closed_form_scores(
    pool: _Pool,
    modality: str,
    *,
    a: float | None = None,
    metrics: set[str] | None = None,
    chunk: int = DEFAULT_CHUNK,
    progress: Progress | None = None,
    precision: str = "float64",
    column: ColumnHook | None = None,
) -> dict[str, np.ndarray]:
    """Closed-form score columns of one side of every sample (SPEC 4-6, column names SPEC 11).

    Streams ``pool.embeddings(modality)`` in chunks of ``chunk`` rows; only one chunk (in float64)
    plus a few (d, d) matrices are in memory at a time, besides the (n,) outputs, which are
    written chunk by chunk (files, with a ``column`` hook that makes memory maps).

    Columns (``side`` = ``modality``):

    * ``dc_{side}``: ``dc`` with vbar = stat ``mean`` of the same modality.
    * ``dw_{side}``: ``dw`` with vbar as above and G = stat ``cov`` of the OTHER modality.
    * ``rawnorm_{side}``: ``rawnorm`` of the stored raw norms; all NaN when the raw embeddings are
      unknown (the caller stores NaN as NULL).
    * ``conformity_{side}``: exact ``conformity`` with stat ``sum`` and ``pool.n``.
    * ``conformity_est_{side}``: ``conformity_est`` with stat ``mean``.
    * ``loglik_{side}``: ``loglik`` with stats ``whiten_mean``, ``whiten``, ``whiten_logdet`` on the
      raw vectors ``rawnorm[i] * v[i]`` when raw norms are known, else on the normalised ``v[i]``.

    Args:
        pool: an opened ``PoolIndex`` (or any object with ``n``, ``logit_scale``, ``embeddings``,
            ``raw_norms`` and ``stat``).
        modality: ``"image"`` or ``"text"``: whose embeddings are scored.
        a: logit scale; defaults to ``pool.logit_scale``.
        metrics: subset of ``METRICS``; defaults to all of them.
        chunk: rows per chunk.
        progress: optional progress hook (advanced by rows).
        precision: type of the (rows, d) x (d, d) products of ``dw`` and ``loglik``: "float64"
            (exact to rounding) or "float32" (3x faster, relative error ~1e-6; what ``score``
            uses). Everything else is float64 either way.
        column: makes the (n,) float64 array each column is written into, given its name
            (``score`` passes ``queries.columns.Columns.new``); default new arrays in memory.

    Returns:
        ``{column name: (n,) float64 array}``, one entry per requested metric (the arrays
        ``column`` made).

    Raises:
        ValueError: unknown modality.
        InvalidParameter: unknown metric, non-positive ``chunk`` or non-finite ``a``.
        BadInput: a statistic or array of the index has the wrong shape or is not finite.
        KeyError: the index lacks a statistic the metric needs.
    """
    check_modality(modality)
    other = _other(modality)
    chunk = _check_chunk(chunk)
    wanted = _check_metrics(metrics)
    a = float(pool.logit_scale if a is None else a)
    if not math.isfinite(a):
        raise InvalidParameter(f"logit scale a must be finite, got {a!r}")
    if precision not in ("float64", "float32"):
        raise InvalidParameter(f"precision must be 'float64' or 'float32', got {precision!r}")

    emb = _embeddings(pool, modality)
    n = pool.n
    norms = _raw_norms(pool, modality) if wanted & {"rawnorm", "loglik"} else None
    stats = _load_stats(pool, modality, other, wanted, emb.shape[1])

    column = column or _in_memory(n)
    out = {f"{m}_{modality}": column(f"{m}_{modality}") for m in sorted(wanted)}
    if "rawnorm" in wanted:
        raw = out[f"rawnorm_{modality}"]
        for s, e in _chunks(n, chunk):
            raw[s:e] = np.nan if norms is None else rawnorm(norms[s:e], a)
    if not wanted - {"rawnorm"}:
        return out
    with (progress or null_progress)(f"closed-form {modality}", n) as advance:
        for s, e in _chunks(n, chunk):
            v = _f64(emb[s:e])
            u = None
            if "loglik" in wanted:
                u = v if norms is None else v * _f64(norms[s:e])[:, None]
            for metric, value in _chunk_scores(v, u, wanted, stats, a, n, precision).items():
                out[f"{metric}_{modality}"][s:e] = value
            advance(e - s)
    return out


def _check_metrics(metrics: set[str] | None) -> set[str]:
    """The requested metrics (all of ``METRICS`` for None); raise naming any unknown one."""
    wanted = set(METRICS) if metrics is None else set(metrics)
    unknown = wanted - METRICS
    if unknown:
        raise InvalidParameter(
            f"Unknown closed-form metric(s) {sorted(unknown)}; choose from {sorted(METRICS)}"
        )
    return wanted


@dataclass
class _Stats:
    """The index statistics the requested metrics read (None where no requested metric needs one)."""

    mean: np.ndarray | None = None  # mean of the normalised vectors of the modality (dc, dw, conformity_est)
    other_cov: np.ndarray | None = None  # covariance of the OTHER modality (dw)
    sum: np.ndarray | None = None  # sum of the normalised vectors (conformity)
    whiten_mean: np.ndarray | None = None  # loglik
    whiten: np.ndarray | None = None
    whiten_logdet: float | None = None


def _load_stats(pool: _Pool, modality: str, other: str, wanted: set[str], d: int) -> _Stats:
    """The statistics the ``wanted`` metrics read, each checked (``_stat``, ``_scalar_stat``)."""
    st = _Stats()
    if wanted & {"dc", "dw", "conformity_est"}:
        st.mean = _stat(pool, modality, "mean", (d,))
    if "dw" in wanted:
        st.other_cov = _stat(pool, other, "cov", (d, d))
    if "conformity" in wanted:
        st.sum = _stat(pool, modality, "sum", (d,))
    if "loglik" in wanted:
        st.whiten_mean = _stat(pool, modality, "whiten_mean", (d,))
        st.whiten = _stat(pool, modality, "whiten", (d, d))
        st.whiten_logdet = _scalar_stat(pool, modality, "whiten_logdet")
    return st


def _chunk_scores(v: np.ndarray, u: np.ndarray | None, wanted: set[str], st: _Stats, a: float, n: int,
                  precision: str) -> dict[str, np.ndarray]:
    """The per-chunk metrics of one chunk of rows, by metric name: ``v`` the normalised rows
    (float64), ``u`` the rows ``loglik`` reads (raw when the norms are known; None when ``loglik``
    is not wanted)."""
    scores = {}
    if "dc" in wanted:
        scores["dc"] = dc(v, st.mean, a)
    if "dw" in wanted:
        scores["dw"] = dw(v, st.mean, st.other_cov, a, precision)
    if "conformity" in wanted:
        scores["conformity"] = conformity(v, st.sum, n)
    if "conformity_est" in wanted:
        scores["conformity_est"] = conformity_est(v, st.mean)
    if "loglik" in wanted:
        scores["loglik"] = loglik(u, st.whiten_mean, st.whiten, st.whiten_logdet, precision)
    return scores


def clipscore_scores(
    pool: _Pool, chunk: int = DEFAULT_CHUNK, progress: Progress | None = None, column: ColumnHook | None = None
) -> np.ndarray:
    """The ``clipscore`` column: CLIPScore of every sample's own image and caption (SPEC 7).

    Args:
        pool: an opened ``PoolIndex`` (needs ``n`` and ``embeddings``).
        chunk: rows per chunk.
        progress: optional progress hook (advanced by rows).
        column: makes the (n,) float64 array the column is written into, chunk by chunk, given its
            name (as ``closed_form_scores``); default a new array in memory.

    Returns:
        (n,) float64 in [0, 2.5] (the array ``column`` made).
    """
    chunk = _check_chunk(chunk)
    img, txt = _embeddings(pool, "image"), _embeddings(pool, "text")
    if img.shape != txt.shape:
        raise BadInput(f"{_where(pool)}: image {img.shape} and text {txt.shape} embeddings differ in shape")
    n = pool.n
    out = (column or _in_memory(n))("clipscore")
    with (progress or null_progress)("clipscore", n) as advance:
        for s, e in _chunks(n, chunk):
            out[s:e] = clipscore(img[s:e], txt[s:e])
            advance(e - s)
    return out

"""Streaming per-modality statistics: mean, sum, covariance and whitening (SPEC sections 4-6).

``StatsAccumulator`` sees the pool batch by batch and keeps float64 sums; ``finalize`` returns the
statistics stored in the catalog's ``modality_stats`` table:

=================  ==========  ==============================================================
name               shape       meaning
=================  ==========  ==============================================================
``mean``           (d,)        mean of the normalised vectors v (SPEC 4: vbar)
``sum``            (d,)        sum of the normalised vectors (SPEC 3: exact mean score; SPEC 5)
``cov``            (d, d)      sample covariance (ddof = 1) of the normalised vectors (SPEC 4: G)
``cov_rows``       ()          how many vectors the covariances were computed from (n unless the
                               builder's ``cov_sample`` subset was used)
``raw_mean``       (d,)        mean of the raw vectors u = rawnorm * v (only when raw is known)
``raw_cov``        (d, d)      sample covariance of the raw vectors (only when raw is known)
``whiten_mean``    (d,)        mu of SPEC 6: ``raw_mean`` when raw is known, else ``mean``
``whiten``         (d, d)      W = S^{-1/2} (symmetric) of the covariance S matching whiten_mean
``whiten_logdet``  ()          log|det W|
=================  ==========  ==============================================================

Covariances use a shifted accumulation for numerical stability: the first batch's mean c is
subtracted before summing, ``cov = (sum (x-c)(x-c)^T - n (mu-c)(mu-c)^T) / (n-1)``, which avoids the
cancellation of ``S2 - n mu mu^T`` when the mean is large against the spread (raw vectors).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np

from clip_density_index.indexer.errors import InvalidParameter, TooMuchMemory

logger = logging.getLogger(__name__)

#: Rows per float64 block inside ``update`` (bounds the temporary copy to ~block * d * 8 bytes).
_BLOCK = 16384


class _Moments:
    """Shifted first and second moments of a stream of vectors, accumulated in float64.

    ``gemm_dtype`` is the type of the per-block product ``y^T y``: float64 (exact to rounding) or
    float32 (about 6x faster on CPUs; the block is centred on the shift, so the relative error of
    the covariance stays around 1e-7).
    """

    def __init__(self, dim: int, gemm_dtype: type = np.float64):
        self.gemm_dtype = gemm_dtype
        self.n = 0
        self.shift: np.ndarray | None = None
        self.s1 = np.zeros(dim, dtype=np.float64)  # sum (x - shift)
        try:
            self.s2 = np.zeros((dim, dim), dtype=np.float64)  # sum (x - shift)(x - shift)^T
        except MemoryError:
            from clip_density_index.indexer.memory import build_bytes, format_bytes

            raise TooMuchMemory(f"Embeddings of dimension {dim:,} need d x d statistics of "
                                f"{format_bytes(8 * dim * dim)} each (a build: about "
                                f"{format_bytes(build_bytes(0, dim))}); this machine cannot allocate "
                                "them") from None

    def update(self, x: np.ndarray) -> None:
        if x.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = x.mean(axis=0, dtype=np.float64)
        self.n += x.shape[0]
        y = x.astype(self.gemm_dtype, copy=False) - self.shift.astype(self.gemm_dtype)
        self.s1 += y.sum(axis=0, dtype=np.float64)
        with np.errstate(over="ignore"):  # huge vectors: whitening() names the non-finite result
            self.s2 += (y.T @ y).astype(np.float64, copy=False)

    def merge(self, other: "_Moments") -> None:
        """Add the moments of another stream (the rows of ``other`` follow this one's)."""
        if other.n == 0:
            return
        if self.n == 0:
            self.n, self.shift, self.s1, self.s2 = other.n, other.shift.copy(), other.s1.copy(), other.s2.copy()
            return
        # other's sums about this shift c: with d = c' - c, sum (x - c) = s1' + n' d and
        # sum (x - c)(x - c)^T = s2' + s1' d^T + d s1'^T + n' d d^T
        d = other._applied_shift() - self._applied_shift()
        self.s2 += other.s2 + np.outer(other.s1, d) + np.outer(d, other.s1) + other.n * np.outer(d, d)
        self.s1 += other.s1 + other.n * d
        self.shift = self._applied_shift()
        self.n += other.n

    def _applied_shift(self) -> np.ndarray:
        """The shift as ``update`` subtracts it (rounded to the product's type)."""
        return self.shift.astype(self.gemm_dtype).astype(np.float64)

    def cov(self) -> np.ndarray:
        assert self.shift is not None and self.n >= 2
        delta = self.s1 / self.n
        cov = (self.s2 - np.outer(self.s1, delta)) / (self.n - 1)
        return (cov + cov.T) / 2


class StatsAccumulator:
    """Accumulate the statistics of one modality over batches of normalised vectors.

    Means and sums are always exact (float64) over every vector. The covariances are exact too unless the
    caller passes a row subset to ``update`` (``cov_rows``): they are then the sample covariance
    of those rows, an unbiased estimate of the pool's (the builder uses a seeded uniform subset of
    ``cov_sample`` rows on large pools: the d x d products are the only super-linear cost of a build).

    Args:
        dim: embedding dimension d.
        raw: True when raw (unnormalised) embeddings are known: every ``update`` then needs the
            raw norms, and whitening uses the raw vectors (SPEC 6 whitens the model's output u).
        precision: "float64" (default: sums and second moments exact to rounding) or "float32"
            (the per-block second-moment products in float32, accumulated over blocks in float64:
            about 6x faster, relative error ~1e-7; sums and means stay float64; the builder uses
            it, since no score ranking can see the difference).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> u = rng.normal(size=(100, 4)) + 3
        >>> acc = StatsAccumulator(4, raw=True)
        >>> norms = np.linalg.norm(u, axis=1)
        >>> acc.update(u[:60] / norms[:60, None], norms[:60])
        >>> acc.update(u[60:] / norms[60:, None], norms[60:])
        >>> stats = acc.finalize()
        >>> bool(np.allclose(stats["raw_cov"], np.cov(u, rowvar=False)))
        True
        >>> acc.whiten_source
        'raw'
    """

    def __init__(self, dim: int, raw: bool, precision: str = "float64"):
        if dim < 1:
            raise InvalidParameter(f"Invalid dim={dim}: must be at least 1")
        if precision not in ("float64", "float32"):
            raise InvalidParameter(f"Invalid precision={precision!r}: must be 'float64' or 'float32'")
        self.dim = dim
        self.raw = bool(raw)
        self._n = 0
        self._sum = np.zeros(dim, dtype=np.float64)
        self._raw_sum = np.zeros(dim, dtype=np.float64) if self.raw else None
        self._gemm = np.float64 if precision == "float64" else np.float32
        self._v = _Moments(dim, self._gemm)
        self._u = _Moments(dim, self._gemm) if self.raw else None

    @property
    def count(self) -> int:
        """Number of vectors seen so far."""
        return self._n

    @property
    def cov_count(self) -> int:
        """Number of vectors the covariances are computed from (``count`` unless subsampled)."""
        return self._v.n

    @property
    def whiten_source(self) -> str:
        """Which vectors ``whiten`` / ``whiten_mean`` describe: ``"raw"`` or ``"normalised"``."""
        return "raw" if self.raw else "normalised"

    def update(self, v: np.ndarray, rawnorm: np.ndarray | None = None,
               cov_rows: np.ndarray | None = None) -> None:
        """Add a batch.

        Args:
            v: (b, d) normalised vectors (any float dtype; sums accumulated in float64).
            rawnorm: (b,) raw norms ``||u||`` (the raw vector is ``rawnorm[:, None] * v``);
                required when ``raw`` is True, must be None otherwise.
            cov_rows: indices (or a boolean mask) of the rows that also enter the covariances;
                None = all rows.

        Raises:
            InvalidParameter: shapes disagree with d / each other, or rawnorm is missing / extra.
        """
        v = np.asarray(v)
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise InvalidParameter(f"Stats batch must have shape (b, {self.dim}), got {v.shape}")
        b = v.shape[0]
        if self.raw:
            if rawnorm is None:
                raise InvalidParameter("Stats batch needs raw norms: the accumulator has raw=True")
            rawnorm = np.asarray(rawnorm)
            if rawnorm.shape != (b,):
                raise InvalidParameter(
                    f"Raw norms must have shape ({b},) to match the batch, got {rawnorm.shape}"
                )
        elif rawnorm is not None:
            raise InvalidParameter("Stats batch has raw norms but the accumulator has raw=False")
        self._n += b
        # the sums are exact (float64) in every precision: SPEC 3's exact mean score uses ``sum``
        self._sum += v.sum(axis=0, dtype=np.float64)
        if self._raw_sum is not None:
            assert rawnorm is not None
            for s in range(0, b, _BLOCK):
                self._raw_sum += (np.asarray(rawnorm[s : s + _BLOCK], dtype=np.float64)
                                  @ np.asarray(v[s : s + _BLOCK], dtype=np.float64))
        if cov_rows is not None:
            v = v[cov_rows]
            rawnorm = None if rawnorm is None else rawnorm[cov_rows]
        for s in range(0, v.shape[0], _BLOCK):
            x = np.asarray(v[s : s + _BLOCK], dtype=self._gemm)
            self._v.update(x)
            if self._u is not None:
                assert rawnorm is not None
                self._u.update(x * np.asarray(rawnorm[s : s + _BLOCK], dtype=self._gemm)[:, None])

    def merge(self, other: "StatsAccumulator") -> None:
        """Add what another accumulator saw (of the same dimension and kind), e.g. the part of the
        pool a worker read: sums and second moments are additive, so the merged statistics are
        those of one accumulator that saw both streams, to floating-point rounding."""
        if (other.dim, other.raw, other._gemm) != (self.dim, self.raw, self._gemm):
            raise InvalidParameter(f"Cannot merge statistics of dim {other.dim} (raw={other.raw}) into "
                                   f"statistics of dim {self.dim} (raw={self.raw})")
        self._n += other._n
        self._sum += other._sum
        if self._raw_sum is not None:
            self._raw_sum += other._raw_sum
            self._u.merge(other._u)
        self._v.merge(other._v)

    def finalize(self, ridge: float = 1e-6) -> dict[str, np.ndarray]:
        """Return the statistics (see the module docstring), all float64.

        Args:
            ridge: whitening regulariser, relative to the mean eigenvalue (see ``whitening``).

        Raises:
            InvalidParameter: fewer than 2 vectors were seen, or the covariance is singular and
                ``ridge`` is 0.
        """
        n = self._n
        if self._v.n < 2:
            raise InvalidParameter(f"Statistics need at least 2 vectors, got {self._v.n}")
        mean = self._sum / n
        out = {"mean": mean, "sum": self._sum.copy(), "cov": self._v.cov(),
               "cov_rows": np.array(self._v.n, dtype=np.float64)}
        if self._u is not None:
            assert self._raw_sum is not None
            raw_mean, raw_cov = self._raw_sum / n, self._u.cov()
            out["raw_mean"], out["raw_cov"] = raw_mean, raw_cov
            wmean, wcov = raw_mean, raw_cov
        else:
            wmean, wcov = mean, out["cov"]
        W, logdet = whitening(wcov, ridge)
        out["whiten_mean"] = wmean.copy()
        out["whiten"] = W
        out["whiten_logdet"] = np.array(logdet, dtype=np.float64)
        logger.info("Statistics of %d vectors (covariances from %d; whitening %s vectors, log|det W| = %.3f)",
                    n, self._v.n, self.whiten_source, logdet)
        return out


def _cov_fraction(n: int, cov_sample: int) -> float:
    return 1.0 if cov_sample == 0 else min(1.0, cov_sample / n)


def cov_row_picker(n: int, cov_sample: int, seed: int = 0) -> Callable[[int], np.ndarray | None]:
    """The covariance subset of a pool of ``n`` rows read in batches: a function that, called with
    each batch's row count in order, returns the batch rows entering the covariances (``cov_rows``
    of ``StatsAccumulator.update``), a seeded uniform draw of about ``cov_sample`` rows in all;
    None (every row) when ``cov_sample`` is 0 or at least ``n``. Row ``i`` of the pool is drawn
    from the i-th value of one random stream (``cov_rows_at`` reads it at any position)."""
    fraction = _cov_fraction(n, cov_sample)
    rng = np.random.default_rng([seed, 17])

    def pick(rows: int) -> np.ndarray | None:
        return None if fraction >= 1.0 else np.flatnonzero(rng.random(rows) < fraction)

    return pick


def cov_rows_at(n: int, cov_sample: int, seed: int, start: int, rows: int) -> np.ndarray | None:
    """The rows of pool rows ``[start, start + rows)`` that ``cov_row_picker(n, cov_sample, seed)``
    puts in the covariance subset (positions relative to ``start``), without drawing the rows
    before them: for a part of the pool read elsewhere.

    >>> pick = cov_row_picker(1000, 100, seed=3)
    >>> first, second = pick(400), pick(600)
    >>> bool(np.array_equal(cov_rows_at(1000, 100, 3, 400, 600), second))
    True
    """
    fraction = _cov_fraction(n, cov_sample)
    if fraction >= 1.0:
        return None
    rng = np.random.default_rng([seed, 17])
    rng.bit_generator.advance(start)  # one 64-bit draw per uniform double
    return np.flatnonzero(rng.random(rows) < fraction)


def whitening(cov: np.ndarray, ridge: float = 1e-6) -> tuple[np.ndarray, float]:
    """Symmetric inverse square root of a covariance, with a relative ridge.

    With the eigendecomposition ``cov = Q diag(lam) Q^T`` (``numpy.linalg.eigh``; eigenvalues
    below 0, which are rounding errors, are set to 0), the regularised eigenvalues are
    ``lam_r = lam + ridge * mean(lam)``, i.e. ``cov + ridge * (trace(cov) / d) * I``, and

    ``W = Q diag(lam_r ** -0.5) Q^T``,  ``log|det W| = -0.5 * sum(log(lam_r))``.

    Args:
        cov: (d, d) symmetric positive semi-definite matrix.
        ridge: relative ridge (>= 0); 0 gives the exact ``cov ** -1/2``.

    Returns:
        ``(W, logdet)``: W (d, d) float64, symmetric; logdet = log|det W| as a float.

    Raises:
        InvalidParameter: negative ridge, or a singular regularised covariance.
    """
    if ridge < 0 or not math.isfinite(ridge):
        raise InvalidParameter(f"Invalid whitening ridge={ridge}: must be a finite number >= 0")
    cov = np.asarray(cov, dtype=np.float64)
    if not np.isfinite(cov).all():
        raise InvalidParameter("Covariance is not finite: the vectors are too large (their squares "
                               "overflow float32)")
    lam, Q = np.linalg.eigh((cov + cov.T) / 2)
    lam = np.clip(lam, 0.0, None)
    lam_r = lam + ridge * lam.mean()
    if not lam.any():
        raise InvalidParameter("Covariance is zero: every vector is the same")
    if not np.all(lam_r > 0):
        raise InvalidParameter(
            f"Covariance is singular ({int(np.sum(lam_r <= 0))} of {len(lam)} eigenvalues are 0) "
            f"with ridge={ridge}; use a positive ridge or more vectors"
        )
    W = (Q * lam_r**-0.5) @ Q.T
    W = (W + W.T) / 2
    return W, float(-0.5 * np.sum(np.log(lam_r)))


def matmul(x: np.ndarray, M: np.ndarray, precision: str = "float64") -> np.ndarray:
    """``x @ M`` in float64, or (``precision`` = "float32") in float32: 3x faster on CPUs for the
    (rows, d) x (d, d) products of ``D_W`` and the whitened likelihood, relative error ~1e-6."""
    if precision == "float64":
        return np.asarray(x, dtype=np.float64) @ np.asarray(M, dtype=np.float64)
    return np.asarray(x, dtype=np.float32) @ np.asarray(M, dtype=np.float32)


def whitened_loglik(
    u: np.ndarray, mu: np.ndarray, W: np.ndarray, logdet: float | np.ndarray, precision: str = "float64"
) -> np.ndarray:
    """Whitened Gaussian log-likelihood surrogate (SPEC 6).

    ``log p(u) = -||W (u - mu)||^2 / 2 - (d / 2) log(2 pi) + log|det W|``

    Pass the vectors the whitening was fitted on (``StatsAccumulator.whiten_source``): raw
    vectors ``rawnorm[:, None] * v`` when raw is known, else the normalised ``v``.

    Args:
        u: (b, d) vectors, or one (d,) vector.
        mu: (d,) ``whiten_mean``.
        W: (d, d) ``whiten``.
        logdet: ``whiten_logdet``.
        precision: type of the product ``(u - mu) W^T``: "float64", or "float32" (3x faster on
            CPUs, relative error ~1e-6; the squares are summed in float64 either way).

    Returns:
        (b,) float64 log-likelihoods (a float64 scalar array for a single vector).
    """
    u = np.asarray(u, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    d = W.shape[0]
    if u.shape[-1] != d or mu.shape != (d,) or W.shape != (d, d):
        raise InvalidParameter(
            f"whitened_loglik shapes disagree: u {u.shape}, mu {mu.shape}, W {W.shape}"
        )
    diff = u - mu
    z = matmul(diff, W.T, precision)
    sq = np.einsum("...i,...i->...", z, z, dtype=np.float64)
    return -0.5 * sq - 0.5 * d * math.log(2 * math.pi) + float(logdet)

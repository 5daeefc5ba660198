"""The held-out accuracy check of a score run (SPEC 3.2): approximate vs exact KL on random rows.

``compare`` gives Spearman, the top-25% overlap and the mean / max absolute error of one column,
with bootstrap 95% intervals; ``held_out_check`` computes the exact values of the check rows
(``check_sample``) and compares every KL column the run computed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from clip_density_index.indexer.progress import Progress

log = logging.getLogger(__name__)

#: Fraction of the checked samples compared by ``top25_overlap``.
TOP_FRACTION = 0.25
#: Bootstrap resamples of the check rows for the 95% intervals.
BOOTSTRAP = 200


@dataclass
class CheckResult:
    """Approximate vs exact values of one KL column on ``n`` random samples."""

    column: str
    n: int
    spearman: float
    mae: float
    max_abs_error: float
    top25_overlap: float
    #: bootstrap 95% intervals (low, high) over the checked rows
    spearman_ci: tuple[float, float] = (math.nan, math.nan)
    top25_overlap_ci: tuple[float, float] = (math.nan, math.nan)
    mae_ci: tuple[float, float] = (math.nan, math.nan)

    def meets(self, spearman: float, overlap: float) -> bool:
        return self.spearman >= spearman and self.top25_overlap >= overlap


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 0-based."""
    order = np.argsort(x, kind="mergesort")
    _, inv, counts = np.unique(x[order], return_inverse=True, return_counts=True)
    avg = np.cumsum(counts) - counts + (counts - 1) / 2.0
    ranks = np.empty(len(x))
    ranks[order] = avg[inv]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of the average ranks); NaN if constant."""
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry / denom) if denom > 0 else float("nan")


def top_overlap(approx: np.ndarray, exact: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """``|top(approx) ∩ top(exact)| / |top(exact)|`` with top = the ``ceil(fraction * n)`` largest."""
    t = max(1, math.ceil(fraction * len(exact)))
    a = np.argsort(-np.asarray(approx), kind="stable")[:t]
    e = np.argsort(-np.asarray(exact), kind="stable")[:t]
    return len(np.intersect1d(a, e)) / t


def compare(column: str, approx: np.ndarray, exact: np.ndarray, seed: int = 0,
            resamples: int = BOOTSTRAP) -> CheckResult:
    """Agreement statistics of approximate vs exact values of one column, with bootstrap 95%
    intervals (``resamples`` resamples of the rows, seeded; 0 = none)."""
    approx, exact = np.asarray(approx, float), np.asarray(exact, float)
    err = np.abs(approx - exact)
    r = CheckResult(column=column, n=len(exact), spearman=spearman(approx, exact), mae=float(err.mean()),
                    max_abs_error=float(err.max()), top25_overlap=top_overlap(approx, exact))
    if resamples and len(exact) > 1:
        rng = np.random.default_rng([seed, 0xB007])
        stats = np.array([(spearman(approx[i], exact[i]), top_overlap(approx[i], exact[i]), err[i].mean())
                          for i in rng.integers(0, len(exact), size=(resamples, len(exact)))])
        lo, hi = np.nanpercentile(stats, [2.5, 97.5], axis=0)
        r.spearman_ci, r.top25_overlap_ci, r.mae_ci = ((float(lo[j]), float(hi[j])) for j in range(3))
    return r


def check_sample(n: int, size: int, seed: int) -> np.ndarray:
    """The vec_ids ``check`` compares: ``size`` distinct ids, seeded independently of the tail."""
    return np.sort(np.random.default_rng([seed, 0xC0FFEE]).choice(n, size=size, replace=False))


def held_out_check(pool, p, cols: dict[str, np.ndarray], progress: Progress, device: str) -> list[CheckResult]:
    """Compare the run's KL columns ``cols`` with exact KL on ``p.check`` random rows per side
    (``p``: the run's ``ScoreParams``)."""
    from clip_density_index.queries.exact import exact_kl
    from clip_density_index.queries.score_params import other_modality

    ids = check_sample(pool.n, p.check, p.seed)
    out = []
    for side in p.sides:
        q = np.asarray(pool.embeddings(side)[ids])
        # the truth in float32 (max error < 1e-4 nats against float64, tests/test_exact.py)
        kl, klr = exact_kl(q, pool.embeddings(other_modality(side)), p.a, p.b, device=device,
                           dtype="float32", progress=progress)
        for metric, exact_values in (("kl", kl), ("klr", klr)):
            col = f"{metric}_{side}"
            if col in cols and metric in p.metrics:
                out.append(compare(col, cols[col][ids], exact_values, seed=p.seed))
                r = out[-1]
                log.info("check %s on %d samples: spearman %.4f, MAE %.4g, top-25%% overlap %.3f",
                         col, r.n, r.spearman, r.mae, r.top25_overlap)
    return out

"""``score``'s parameters: the defaults, the checks of every value, and the resolved ``ScoreParams``.

``resolve_params`` takes the library's keyword arguments and the index, fills the defaults from the
index (logit scale and bias) and from this module, and raises ``InvalidParameter`` naming any value
out of range. ``work_name`` keys the resumable chunk folder by every parameter that decides the
chunk files' contents.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from clip_density_index.indexer import defaults
from clip_density_index.indexer.choose import SCORE_TAIL
from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.indexer.layout import MODALITIES
from clip_density_index.indexer.pool import PoolIndex
from clip_density_index.indexer.validate import check_seed

#: Defaults of the estimator (SPEC 3), tuned by the benchmarks (``bench/``): neighbours per query
#: and the size of the uniform tail sample (defined beside the default nprobe, whose dot-product
#: budget counts it: ``indexer.choose.SCORE_TAIL``).
DEFAULT_K = defaults.K
DEFAULT_TAIL = SCORE_TAIL
#: Queries per resumable chunk.
DEFAULT_BATCH = defaults.SCORE_BATCH

KL_METRICS = ("kl", "klr")
CLOSED_FORM_METRICS = ("dc", "dw", "rawnorm", "conformity", "conformity_est", "loglik")
#: Every metric ``score`` knows, in SPEC 11 column order.
METRICS = KL_METRICS + CLOSED_FORM_METRICS + ("clipscore",)
SIDES = {"both": ("text", "image"), "text": ("text",), "image": ("image",)}
#: Every score column, in the order of SPEC 11 (also the order of ``scores``' columns).
SCORE_COLUMNS = tuple(f"{m}_{s}" for m in METRICS[:-1] for s in ("text", "image")) + ("clipscore",)
#: KL estimators (``--estimator``). ``auto`` picks exact or strata per run (``queries.choice``).
ESTIMATORS = ("auto", "exact", "strata", "mimps", "paper")
#: Held-out exact rows per side that every approximate run checks itself on (SPEC 3.2); fewer on
#: small pools (``default_check``). 4,000 rows resolve the top-25% overlap to ~0.1 points.
DEFAULT_CHECK = defaults.CHECK
#: Accuracy targets of an approximate run's held-out check (``--target-spearman`` / ``--target-overlap``).
TARGET_SPEARMAN = defaults.TARGET_SPEARMAN
TARGET_OVERLAP = defaults.TARGET_OVERLAP
#: The paper's DataComp filter: a softmax over a uniform sample of this fraction of the pool.
PAPER_SAMPLE = defaults.PAPER_SAMPLE
#: The fewest candidates a paper sample may have (one candidate makes every KL 0).
PAPER_MIN = 16
#: Largest logit scale accepted (CLIP's is ~100; e^(a * 2) must stay within float64 after the shift).
MAX_LOGIT_SCALE = 1e4


def other_modality(modality: str) -> str:
    return MODALITIES[1 - MODALITIES.index(modality)]


@dataclass(frozen=True)
class ScoreParams:
    """Every value a run uses, resolved and checked (``resolve_params``)."""

    estimator: str  # exact | strata | mimps | paper | none (no KL column); auto is resolved before
    reason: str
    precision: str
    sides: tuple[str, ...]
    metrics: tuple[str, ...]
    k: int | None
    m: int | None
    a: float
    b: float | None
    seed: int
    batch_size: int
    nprobe: int | None
    check: int | None
    paper_sample: float
    targets: tuple[float, float]
    strata_target: float
    max_fraction: float

    @property
    def exact(self) -> bool:
        return self.estimator == "exact"

    @property
    def kl(self) -> bool:
        return any(m in KL_METRICS for m in self.metrics)

    @property
    def columns(self) -> list[str]:
        """The score columns this run computes, in ``SCORE_COLUMNS`` order."""
        return [c for c in SCORE_COLUMNS
                if c == "clipscore" and "clipscore" in self.metrics
                or c.rsplit("_", 1)[0] in self.metrics and c.rsplit("_", 1)[1] in self.sides]


def default_check(n: int) -> int:
    """Held-out rows per side for an approximate run: ``DEFAULT_CHECK``, at most a quarter of a
    small pool (and at least 2 rows, the fewest a Spearman needs)."""
    return max(min(2, n), min(DEFAULT_CHECK, n // 4))


def check_estimator_options(estimator: str, exact: bool, mimps_given: list[str], strata_given: list[str]) -> str:
    """The estimator asked for (``exact=True`` means ``"exact"``), with the options given for one
    estimator refused for another; raises ``InvalidParameter`` naming them."""
    if estimator not in ESTIMATORS:
        raise InvalidParameter(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if exact and estimator not in ("auto", "exact"):
        raise InvalidParameter(f"exact=True contradicts estimator={estimator!r}")
    if exact:
        estimator = "exact"
    if mimps_given and estimator in ("exact", "paper", "strata"):
        raise InvalidParameter(f"{' / '.join(mimps_given)} only apply to the mimps estimator, not {estimator}")
    if strata_given and estimator not in ("strata", "auto") or strata_given and mimps_given:
        raise InvalidParameter(f"{' / '.join(strata_given)} only apply to the strata estimator, not "
                               f"{'mimps' if mimps_given else estimator}")
    return estimator


def resolve_params(pool: PoolIndex, *, estimator, k, tail_sample, side, logit_scale, logit_bias, metrics, seed,
                   batch_size, nprobe, check, precision, paper_sample, target_spearman, target_overlap,
                   device, strata_target=None, max_fraction=None) -> ScoreParams:
    """Defaults from the index, and every value checked; raises ``InvalidParameter`` naming it.
    ``estimator`` is already one of exact / strata / mimps / paper (``queries.choice`` resolves auto)."""
    n = pool.n
    if side not in SIDES:
        raise InvalidParameter(f"side must be one of {', '.join(SIDES)}; got {side!r}")
    metrics = _metrics(metrics)
    kl = any(m in KL_METRICS for m in metrics)
    a, b = _scale(pool, logit_scale, logit_bias)
    _check_sizes(n, k=k, tail_sample=tail_sample, batch_size=batch_size, nprobe=nprobe, check=check)
    seed = check_seed(seed)
    if check is not None and not kl:
        raise InvalidParameter(f"check={check} compares kl/klr columns, but metrics {list(metrics)} has neither")
    _check_paper(n, paper_sample, estimator == "paper" and kl)
    strata_target, max_fraction = _strata_options(strata_target, max_fraction)
    for name, v in (("target_spearman", target_spearman), ("target_overlap", target_overlap)):
        if not (isinstance(v, (int, float)) and 0 <= v <= 1):
            raise InvalidParameter(f"{name} must be between 0 and 1, got {v!r}")
    precision = _precision(precision, device)
    approx = kl and estimator != "exact"
    if approx and estimator == "mimps":
        k = min(DEFAULT_K, n) if k is None else int(k)
        m = min(DEFAULT_TAIL, n) if tail_sample is None else int(tail_sample)
    else:
        k = m = None
    if approx and check is None:
        check = default_check(n)  # SPEC 3.2: no approximate scores without their measured accuracy
    return ScoreParams(
        estimator=estimator if kl else "none", reason="", precision=precision, sides=SIDES[side],
        metrics=metrics, k=k, m=m, a=a, b=b, seed=int(seed),
        batch_size=int(batch_size or DEFAULT_BATCH), nprobe=None if nprobe is None else int(nprobe),
        check=None if check is None else int(check), paper_sample=float(paper_sample),
        targets=(float(target_spearman), float(target_overlap)), strata_target=float(strata_target),
        max_fraction=float(max_fraction),
    )


def _metrics(metrics) -> tuple[str, ...]:
    if metrics is None:
        return METRICS
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise InvalidParameter(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    if not metrics:
        raise InvalidParameter("metrics is empty; choose from " + ", ".join(METRICS))
    return tuple(m for m in METRICS if m in set(metrics))


def _scale(pool: PoolIndex, logit_scale, logit_bias) -> tuple[float, float | None]:
    """The logit scale a and SigLIP bias b: given, or the index's."""
    a = pool.logit_scale if logit_scale is None else logit_scale
    if not (isinstance(a, (int, float)) and math.isfinite(a) and 0 < a <= MAX_LOGIT_SCALE):
        raise InvalidParameter(f"logit_scale must be a positive number up to {MAX_LOGIT_SCALE:g} "
                               f"(CLIP's is about 100), got {a!r}")
    b = pool.logit_bias if logit_bias is None else logit_bias
    if b is not None and not (math.isfinite(b) and abs(b) <= MAX_LOGIT_SCALE):
        raise InvalidParameter(f"logit_bias must be a finite number within ±{MAX_LOGIT_SCALE:g}, got {b!r}")
    if b is not None and pool.n < 2:
        raise InvalidParameter(f"SigLIP scores (logit_bias={b}) need at least 2 samples, the index has {pool.n}")
    return float(a), None if b is None else float(b)


def _check_sizes(n: int, *, k, tail_sample, batch_size, nprobe, check) -> None:
    if k is not None and not 1 <= k <= n:
        raise InvalidParameter(f"k must be between 1 and N={n} (the pool size), got k={k}")
    if tail_sample is not None and not 0 <= tail_sample <= n:
        raise InvalidParameter(f"tail_sample must be between 0 and N={n} (the pool size), got {tail_sample}")
    if batch_size is not None and batch_size < 1:
        raise InvalidParameter(f"batch_size must be at least 1, got {batch_size}")
    if nprobe is not None and nprobe < 1:
        raise InvalidParameter(f"nprobe must be at least 1, got {nprobe}")
    if check is not None and not 2 <= check <= n:
        raise InvalidParameter(f"check must be between 2 and N={n} (the pool size), got {check}")


def _check_paper(n: int, paper_sample, used: bool) -> None:
    if not (isinstance(paper_sample, (int, float)) and 0 < paper_sample <= 1):
        raise InvalidParameter(f"paper_sample must be a fraction of the pool in (0, 1], got {paper_sample!r}")
    if used and math.ceil(paper_sample * n) < PAPER_MIN:
        raise InvalidParameter(
            f"paper_sample {paper_sample:g} of N={n:,} is {math.ceil(paper_sample * n)} candidate(s); the paper "
            f"estimator needs at least {PAPER_MIN} (raise paper_sample to {PAPER_MIN / n:.3g} or more)")


def _strata_options(strata_target, max_fraction) -> tuple[float, float]:
    from clip_density_index.queries import strata

    strata_target = strata.DEFAULT_TARGET if strata_target is None else strata_target
    max_fraction = strata.DEFAULT_MAX_FRACTION if max_fraction is None else max_fraction
    for name, v in (("strata_target", strata_target), ("max_fraction", max_fraction)):
        if not (isinstance(v, (int, float)) and 0 < v <= 1):
            raise InvalidParameter(f"{name} must be in (0, 1], got {v!r}")
    return strata_target, max_fraction


def _precision(precision, device: str) -> str:
    from clip_density_index.queries.exact import PRECISIONS

    if precision is None:
        from clip_density_index.indexer.device import resolve_device

        precision = "float16" if resolve_device(device).type == "cuda" else "float32"
    if precision not in PRECISIONS:
        raise InvalidParameter(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def work_name(pool: PoolIndex, p: ScoreParams) -> str:
    """``score-<hash>``: every parameter that determines the KL chunk files' contents or their set
    (two runs with different sides or metrics must not share a folder), and for a run without KL
    (no chunks, only its column files, ``queries.columns``) the columns it computes. The engine is
    not part of it: a run interrupted on one engine resumes on the other."""
    key = {
        "n": pool.n, "created_at": str(pool.manifest.get("created_at")),
        "index": [pool.manifest.get("image_index"), pool.manifest.get("text_index")],
        "estimator": p.estimator, "precision": p.precision, "sides": list(p.sides),
        "kl_metrics": [m for m in p.metrics if m in KL_METRICS], "paper_sample": p.paper_sample,
        "strata": [p.strata_target, p.max_fraction, p.check],
        "k": p.k, "m": p.m, "a": p.a, "b": p.b, "seed": p.seed, "batch_size": p.batch_size, "nprobe": p.nprobe,
    }
    if not p.kl:  # runs of other closed-form columns work side by side
        key["columns"] = p.columns
    return "score-" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

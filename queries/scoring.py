"""``score``: every score column of SPEC 11 for a built index, into the catalog's ``scores`` table.

* KL columns (``kl_*``, ``klr_*``): the top-k + sampled-tail estimator (``queries.estimate``, SPEC 3)
  or, with ``exact=True``, the full softmax over the whole pool (``queries.exact``, SPEC 2). Queries
  are processed in chunks of ``batch_size``; each finished chunk is written as a parquet file under
  ``IndexPaths(root).work_dir("score-<hash of the parameters>")``, so a rerun with the same
  parameters after an interruption skips the chunks already done.
* Closed-form columns (``dc``, ``dw``, ``rawnorm``, ``conformity``, ``conformity_est``, ``loglik``,
  ``clipscore``): ``queries.closed_form`` (O(n d)).
* ``check=N``: exact KL on N random samples (seeded), compared with the approximate values
  (Spearman, mean absolute error, top-25% overlap); reported and stored in ``score_checks``.

The new ``scores`` table is built aside as ``scores__new`` and swapped in one transaction, together
with the ``score_runs`` (and ``score_checks``) rows. Score columns of an older ``scores`` table that
this run did not compute are carried over. The work directory is deleted after success.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_density_index.indexer import defaults, lock
from clip_density_index.indexer.choose import SCORE_TAIL
from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.indexer.layout import MODALITIES
from clip_density_index.indexer.pool import PoolIndex, as_pool
from clip_density_index.indexer.progress import Progress, null_progress
from clip_density_index.indexer.validate import check_seed

log = logging.getLogger(__name__)

#: Defaults of the estimator (SPEC 3) and of a run: their values and reasons are in ``indexer.defaults``.
DEFAULT_K = defaults.K
DEFAULT_TAIL = SCORE_TAIL
DEFAULT_BATCH = defaults.SCORE_BATCH
#: Seconds ``score`` waits for another process (a long ``sql``, a notebook's kept reader) to let go
#: of the catalog before it writes, at the start and for the final write.
CATALOG_WAIT = 120.0

KL_METRICS = ("kl", "klr")
CLOSED_FORM_METRICS = ("dc", "dw", "rawnorm", "conformity", "conformity_est", "loglik")
#: Every metric ``score`` knows, in SPEC 11 column order.
METRICS = KL_METRICS + CLOSED_FORM_METRICS + ("clipscore",)
SIDES = {"both": ("text", "image"), "text": ("text",), "image": ("image",)}
#: Every score column, in the order of SPEC 11 (also the order of ``scores``' columns).
SCORE_COLUMNS = tuple(f"{m}_{s}" for m in METRICS[:-1] for s in ("text", "image")) + ("clipscore",)
#: Fraction of the checked samples compared by ``top25_overlap``.
TOP_FRACTION = 0.25
#: KL estimators (``--estimator``). ``auto`` picks exact or strata per run (``_choose``).
ESTIMATORS = ("auto", "exact", "strata", "mimps", "paper")
#: Pools smaller than this are scored exactly by ``auto`` without timing anything.
AUTO_EXACT_BELOW = defaults.AUTO_EXACT_BELOW
#: Held-out exact rows per side that every approximate run checks itself on (SPEC 3.2); fewer on
#: small pools (``default_check``).
DEFAULT_CHECK = defaults.CHECK
#: Bootstrap resamples of the check rows for the 95% intervals.
BOOTSTRAP = 200
#: Accuracy targets of an approximate run's held-out check (``--target-spearman`` / ``--target-overlap``).
TARGET_SPEARMAN = defaults.TARGET_SPEARMAN
TARGET_OVERLAP = defaults.TARGET_OVERLAP
#: The paper's DataComp filter: a softmax over a uniform sample of this fraction of the pool.
PAPER_SAMPLE = defaults.PAPER_SAMPLE
#: The fewest candidates a paper sample may have (one candidate makes every KL 0).
PAPER_MIN = 16
#: Largest logit scale accepted (CLIP's is ~100; e^(a * 2) must stay within float64 after the shift).
MAX_LOGIT_SCALE = 1e4


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


@dataclass
class ScoreReport:
    """What a ``score`` run computed, with what parameters, and how long it took."""

    run_id: int
    path: Path
    columns: list[str]
    n: int
    exact: bool
    estimator: str | None  # exact | mimps | paper; None: no KL column
    reason: str  # why this estimator (auto's choice, or "asked for")
    precision: str | None  # score precision of exact work (exact, paper, the check)
    sides: tuple[str, ...]
    k: int | None
    m: int | None
    logit_scale: float
    logit_bias: float | None
    seed: int
    nprobe: dict[str, int | None] = field(default_factory=dict)  # per side: lists probed
    index_keys: dict[str, str] = field(default_factory=dict)  # per side: FAISS key searched
    rescored: dict[str, bool] = field(default_factory=dict)  # per side: neighbours rescored
    dots_per_query: dict[str, float | None] = field(default_factory=dict)  # per side; None: not counted
    seconds: dict[str, float] = field(default_factory=dict)  # per phase
    chunks_computed: int = 0
    chunks_reused: int = 0
    checks: list[CheckResult] = field(default_factory=list)
    targets: tuple[float, float] = (TARGET_SPEARMAN, TARGET_OVERLAP)  # (Spearman, top-25% overlap)
    details: dict[str, dict] = field(default_factory=dict)  # per side: the estimator's own figures

    @property
    def targets_met(self) -> bool | None:
        """Whether every checked column met the targets; None without a check."""
        return all(c.meets(*self.targets) for c in self.checks) if self.checks else None

    @property
    def total_seconds(self) -> float:
        return self.seconds.get("total", sum(self.seconds.values()))


def other_modality(modality: str) -> str:
    return MODALITIES[1 - MODALITIES.index(modality)]


# -- parameters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Params:
    estimator: str  # exact | mimps | paper (auto is resolved before)
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


def default_check(n: int) -> int:
    """Held-out rows per side for an approximate run: ``DEFAULT_CHECK``, at most a quarter of a
    small pool (and at least 2 rows, the fewest a Spearman needs)."""
    return max(min(2, n), min(DEFAULT_CHECK, n // 4))


def _resolve(pool: PoolIndex, *, estimator, k, tail_sample, side, logit_scale, logit_bias, metrics, seed,
             batch_size, nprobe, check, precision, paper_sample, target_spearman, target_overlap,
             device, strata_target=None, max_fraction=None) -> _Params:
    """Defaults from the index, and every value checked; raises ``InvalidParameter`` naming it.
    ``estimator`` is already one of exact / mimps / paper (``_choose`` resolves auto)."""
    from clip_density_index.queries.exact import PRECISIONS

    n = pool.n
    if side not in SIDES:
        raise InvalidParameter(f"side must be one of {', '.join(SIDES)}; got {side!r}")
    metrics = _metrics(metrics)
    a = pool.logit_scale if logit_scale is None else logit_scale
    if not (isinstance(a, (int, float)) and math.isfinite(a) and 0 < a <= MAX_LOGIT_SCALE):
        raise InvalidParameter(f"logit_scale must be a positive number up to {MAX_LOGIT_SCALE:g} "
                               f"(CLIP's is about 100), got {a!r}")
    b = pool.logit_bias if logit_bias is None else logit_bias
    if b is not None and not (math.isfinite(b) and abs(b) <= MAX_LOGIT_SCALE):
        raise InvalidParameter(f"logit_bias must be a finite number within ±{MAX_LOGIT_SCALE:g}, got {b!r}")
    if b is not None and n < 2:
        raise InvalidParameter(f"SigLIP scores (logit_bias={b}) need at least 2 samples, the index has {n}")
    if k is not None and not 1 <= k <= n:
        raise InvalidParameter(f"k must be between 1 and N={n} (the pool size), got k={k}")
    if tail_sample is not None and not 0 <= tail_sample <= n:
        raise InvalidParameter(f"tail_sample must be between 0 and N={n} (the pool size), got {tail_sample}")
    if batch_size is not None and batch_size < 1:
        raise InvalidParameter(f"batch_size must be at least 1, got {batch_size}")
    seed = check_seed(seed)
    if nprobe is not None and nprobe < 1:
        raise InvalidParameter(f"nprobe must be at least 1, got {nprobe}")
    if check is not None and not 2 <= check <= n:
        raise InvalidParameter(f"check must be between 2 and N={n} (the pool size), got {check}")
    kl = any(m in KL_METRICS for m in metrics)
    if check is not None and not kl:
        raise InvalidParameter(f"check={check} compares kl/klr columns, but metrics {list(metrics)} has neither")
    if not (isinstance(paper_sample, (int, float)) and 0 < paper_sample <= 1):
        raise InvalidParameter(f"paper_sample must be a fraction of the pool in (0, 1], got {paper_sample!r}")
    if estimator == "paper" and kl and math.ceil(paper_sample * n) < PAPER_MIN:
        raise InvalidParameter(
            f"paper_sample {paper_sample:g} of N={n:,} is {math.ceil(paper_sample * n)} candidate(s); the paper "
            f"estimator needs at least {PAPER_MIN} (raise paper_sample to {PAPER_MIN / n:.3g} or more)")
    for name, v in (("target_spearman", target_spearman), ("target_overlap", target_overlap)):
        if not (isinstance(v, (int, float)) and 0 <= v <= 1):
            raise InvalidParameter(f"{name} must be between 0 and 1, got {v!r}")
    from clip_density_index.queries import strata

    strata_target = strata.DEFAULT_TARGET if strata_target is None else strata_target
    max_fraction = strata.DEFAULT_MAX_FRACTION if max_fraction is None else max_fraction
    for name, v in (("strata_target", strata_target), ("max_fraction", max_fraction)):
        if not (isinstance(v, (int, float)) and 0 < v <= 1):
            raise InvalidParameter(f"{name} must be in (0, 1], got {v!r}")
    if precision is None:
        from clip_density_index.indexer.device import resolve_device

        precision = "float16" if resolve_device(device).type == "cuda" else "float32"
    if precision not in PRECISIONS:
        raise InvalidParameter(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    approx = kl and estimator != "exact"
    if approx and estimator == "mimps":
        k = min(DEFAULT_K, n) if k is None else int(k)
        m = min(DEFAULT_TAIL, n) if tail_sample is None else int(tail_sample)
    else:
        k = m = None
    if approx and check is None:
        check = default_check(n)  # SPEC 3.2: no approximate scores without their measured accuracy
    return _Params(
        estimator=estimator if kl else "none", reason="", precision=precision, sides=SIDES[side],
        metrics=metrics, k=k, m=m, a=float(a), b=None if b is None else float(b), seed=int(seed),
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


def _work_name(pool: PoolIndex, p: _Params) -> str:
    """``score-<hash>``: every parameter that determines the KL chunk files' contents or their set
    (two runs with different sides or metrics must not share a folder)."""
    key = {
        "n": pool.n, "created_at": str(pool.manifest.get("created_at")),
        "index": [pool.manifest.get("image_index"), pool.manifest.get("text_index")],
        "estimator": p.estimator, "precision": p.precision, "sides": list(p.sides),
        "kl_metrics": [m for m in p.metrics if m in KL_METRICS], "paper_sample": p.paper_sample,
        "strata": [p.strata_target, p.max_fraction, p.check],
        "k": p.k, "m": p.m, "a": p.a, "b": p.b, "seed": p.seed, "batch_size": p.batch_size, "nprobe": p.nprobe,
    }
    return "score-" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# -- KL chunks -----------------------------------------------------------------------------------


def _chunk_path(work: Path, side: str, start: int) -> Path:
    return work / f"{side}-{start:012d}.parquet"


def _write_atomic(table: pa.Table, path: Path) -> None:
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


def _done(path: Path, columns: tuple[str, ...], rows: int) -> bool:
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


@contextlib.contextmanager
def _chunk_scorer(pool: PoolIndex, side: str, p: _Params, report: ScoreReport,
                  device: str) -> Iterator[Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]]:
    """Set up one side's KL computation; yields ``f(queries, vec_ids) -> (kl, klr)`` for a chunk.

    Records the side's cost (dot products per query), index key, nprobe and rescoring in ``report``.
    """
    from clip_density_index.queries.exact import exact_kl

    n, other, secs = pool.n, other_modality(side), report.seconds
    candidates = pool.embeddings(other)
    if p.estimator in ("exact", "paper"):
        if p.estimator == "paper":
            ids = paper_sample_ids(n, p.paper_sample, p.seed, side)
            candidates = np.asarray(candidates[ids])
        report.dots_per_query[side] = float(len(candidates))

        def exact_chunk(q: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            t0 = time.perf_counter()
            out = exact_kl(q, candidates, p.a, p.b, device=device, dtype=p.precision)
            secs[f"kl_{side}.{p.estimator}"] = secs.get(f"kl_{side}.{p.estimator}", 0.0) + time.perf_counter() - t0
            return out

        yield exact_chunk
        return
    scorer = _strata_scorer if p.estimator == "strata" else _mimps_scorer
    with scorer(pool, side, p, report, device, candidates) as f:
        yield f


#: Why auto's approximate run was replaced by the exact one, per index (read by ``score``).
_MISSED: dict[str, str] = {}
#: Strata plans (with calibration rows and gamma) that ``auto`` built while timing, for the run.
_PLANS: dict[tuple, tuple] = {}


def _plan_key(pool: PoolIndex, p: _Params, side: str) -> tuple:
    return (str(pool.root), pool.manifest.get("created_at"), side, p.seed, p.a, p.strata_target, p.max_fraction)


def calibration_ids(n: int, size: int, check: int | None, seed: int, side: str) -> np.ndarray:
    """Random vec_ids whose exact rows fit the strata model, disjoint from the held-out check rows
    (SPEC 3.2); at most half of what the check leaves."""
    taken = np.zeros(n, dtype=bool)
    if check:
        taken[check_sample(n, check, seed)] = True
    free = np.flatnonzero(~taken)
    rng = np.random.default_rng([seed, 0xCA1, MODALITIES.index(side)])
    return np.sort(rng.choice(free, size=min(size, max(1, len(free) // 2)), replace=False))


@contextlib.contextmanager
def _strata_scorer(pool, side, p, report, device, candidates):
    """SPEC 3.2 strata: the candidates in lists, each query's likely lists scanned exactly as GEMMs,
    the rest by a log-normal model whose scale is fitted on exact calibration rows of this run
    (``queries.strata``)."""
    import duckdb

    from clip_density_index.queries import strata

    n, secs = pool.n, report.seconds
    queries = pool.embeddings(side)
    kept = _PLANS.pop(_plan_key(pool, p, side), None)  # built by auto's timing
    if kept is None:
        t0 = time.perf_counter()
        plan = strata.build_plan(candidates, seed=p.seed, queries=queries)
        secs[f"kl_{side}.plan"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cal = calibration_ids(n, strata.CALIBRATION_QUERIES, p.check, p.seed, side)
        gamma = strata.calibrate(plan, np.asarray(queries[cal], dtype=np.float32), p.a, target=p.strata_target,
                                 max_fraction=p.max_fraction, own_ids=cal)
        secs[f"kl_{side}.calibrate"] = time.perf_counter() - t0
    else:
        plan, cal, gamma = kept
    scanned = [0.0, 0]
    detail = report.details.setdefault(side, {})
    detail.update(lists=plan.n_lists, gamma=gamma, calibration_rows=len(cal), target=p.strata_target,
                  max_fraction=p.max_fraction)
    with duckdb.connect() as con:

        def strata_chunk(q: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            t = time.perf_counter()
            part = strata.partials(plan, q, p.a, gamma=gamma, target=p.strata_target, max_fraction=p.max_fraction,
                                   query_ids=ids, own_ids=ids)
            scanned[0] += float(np.sum(part.column("scanned_n").to_numpy()))
            scanned[1] += len(ids)
            secs[f"kl_{side}.scan"] = secs.get(f"kl_{side}.scan", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            res = strata.strata_kl(con, part, n, p.b)
            secs[f"kl_{side}.sql"] = secs.get(f"kl_{side}.sql", 0.0) + time.perf_counter() - t
            return res.column("kl").to_numpy(), res.column("klr").to_numpy()

        yield strata_chunk
    if scanned[1]:  # this run's chunks (a resumed run counts only those it computed)
        detail["scanned_fraction"] = scanned[0] / scanned[1] / n
        report.dots_per_query[side] = scanned[0] / scanned[1] + plan.n_lists + strata.VAR_RANK + 1


def paper_sample_ids(n: int, fraction: float, seed: int, side: str) -> np.ndarray:
    """The paper's DataComp filter's candidates for one side: ``ceil(fraction * n)`` ids drawn
    uniformly WITH replacement (seeded per side); a query's own pair is not forced in."""
    m = max(1, math.ceil(fraction * n))
    return np.random.default_rng([seed, 0x9A9E5, MODALITIES.index(side)]).integers(0, n, size=m)


@contextlib.contextmanager
def _mimps_scorer(pool, side, p, report, device, candidates):
    """SPEC 3.1: FAISS top-k head + one shared uniform tail sample (``queries.estimate``)."""
    import duckdb

    from clip_density_index.indexer import choose, faiss_index
    from clip_density_index.queries import estimate
    from clip_density_index.queries.exact import resolve_device

    n, other, secs = pool.n, other_modality(side), report.seconds
    t0 = time.perf_counter()
    index = pool.faiss(other)
    params = faiss_index.index_params(index)
    nprobe = p.nprobe if p.nprobe is not None else params.get("nprobe")
    rescored = estimate.needs_rescore(index)
    if resolve_device(device).type == "cuda" and faiss_index.gpu_available() and p.k <= 2048:
        try:  # search on the GPU (FAISS GPU indexes return at most 2048 neighbours)
            index = faiss_index.to_gpu(index)
        except (RuntimeError, InvalidParameter) as e:
            log.warning("searching the %s index on the CPU: it cannot move to the GPU (%s)", other, e)
    tail_ids = estimate.draw_tail(n, p.m, p.seed)
    cand_sum = _cand_sum(pool, other)
    constants = dict(tail_ids=tail_ids, tail_vectors=np.asarray(candidates[tail_ids]), cand_sum=cand_sum)
    try:
        search_dots = choose.dots_per_query(params["key"], n, nprobe or 1)
    except InvalidParameter:  # HNSW: data-dependent cost
        search_dots = float("nan")
    report.index_keys[side] = params["key"]
    report.nprobe[side] = None if params.get("nlist") is None else min(nprobe, params["nlist"])
    report.rescored[side] = rescored
    dots = estimate.dots_per_query(search_dots, p.k, p.m, rescored, own_pair=True)
    report.dots_per_query[side] = dots if math.isfinite(dots) else None  # None: not counted (HNSW)
    secs[f"kl_{side}.setup"] = time.perf_counter() - t0

    with duckdb.connect() as con:

        def estimate_chunk(q: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            res = estimate.estimate_kl(
                index, q, candidates, p.k, p.a, p.b, nprobe=p.nprobe, rescore=rescored, query_ids=ids,
                own_ids=ids, con=con, device=device, timings=secs, prefix=f"kl_{side}.", **constants,
            )
            if not np.array_equal(res.column("query").to_numpy(), ids):
                raise RuntimeError(f"kl_per_sample returned queries out of order for vec_ids {ids[0]}..{ids[-1]}")
            return res.column("kl").to_numpy(), res.column("klr").to_numpy()

        yield estimate_chunk


def _kl_side(pool: PoolIndex, side: str, p: _Params, work: Path, report: ScoreReport,
             progress: Progress, device: str) -> None:
    """Compute (or reuse) every chunk of ``kl_{side}``/``klr_{side}`` as parquet files in ``work``."""
    n, secs = pool.n, report.seconds
    queries = pool.embeddings(side)
    names = (f"kl_{side}", f"klr_{side}")
    with _chunk_scorer(pool, side, p, report, device) as score_chunk, \
            progress(f"KL scores ({side} side, {p.estimator})", n) as advance:
        for start in range(0, n, p.batch_size):
            stop = min(start + p.batch_size, n)
            path = _chunk_path(work, side, start)
            if _done(path, names, stop - start):
                report.chunks_reused += 1
            else:
                ids = np.arange(start, stop, dtype=np.int64)
                kl, klr = score_chunk(np.asarray(queries[start:stop], dtype=np.float32), ids)
                t0 = time.perf_counter()
                _write_atomic(pa.table({"vec_id": ids, names[0]: kl, names[1]: klr}), path)
                secs[f"kl_{side}.write"] = secs.get(f"kl_{side}.write", 0.0) + time.perf_counter() - t0
                report.chunks_computed += 1
            advance(stop - start)


def _kl_exact_both(pool: PoolIndex, p: _Params, work: Path, report: ScoreReport, progress: Progress,
                   device: str) -> dict[str, np.ndarray]:
    """Both sides exactly from one pass over ``S = a T I'`` (``queries.exact.exact_moments``).

    Resumable like the one-sided chunks: chunk ``c`` (captions ``start..stop``) writes the captions'
    finished kl_text / klr_text, then folds the images' column partials over those captions into
    one running file (``imagecols.parquet``, O(n) on disk whatever the number of chunks) that
    records which chunks it holds. A chunk counts as done when its rows file exists and the running
    partials hold it; a crash between the two writes recomputes the chunk and folds it in once.
    """
    from clip_density_index.queries.exact import Moments, exact_moments, resolve_device, stage

    n, secs = pool.n, report.seconds
    texts, images = pool.embeddings("text"), pool.embeddings("image")
    gpu = resolve_device(device)
    if gpu.type == "cuda":  # the images once on the GPU, not once per chunk of captions
        images = stage(images, gpu, p.precision)
    report.dots_per_query.update(text=float(n), image=float(n))
    names = ("kl_text", "klr_text")
    mean_text = mean_scores(texts, _cand_sum(pool, "image"), p.a, n)
    mean_image = mean_scores(pool.embeddings("image"), _cand_sum(pool, "text"), p.a, n)
    cols_path = work / "imagecols.parquet"
    columns, merged = Moments(n), set()
    if _done(cols_path, ("max", "s0", "s1"), n):
        part = pq.read_table(cols_path)
        columns = Moments.of(*(part.column(c).to_numpy() for c in ("max", "s0", "s1")))
        merged = set(json.loads(part.schema.metadata[b"chunks"]))
    with progress("KL scores (both sides, exact)", n) as advance:
        for start in range(0, n, p.batch_size):
            stop = min(start + p.batch_size, n)
            rows_path = _chunk_path(work, "text", start)
            if start in merged and _done(rows_path, names, stop - start):
                report.chunks_reused += 1
                advance(stop - start)
                continue
            t0 = time.perf_counter()
            rows, cols = exact_moments(texts[start:stop], images, p.a, rows=True, cols=start not in merged,
                                       device=device, precision=p.precision,
                                       progress=lambda label, total: _forward(advance))
            kl, klr = rows.kl(mean_text[start:stop], n, p.b)
            secs["kl_both.exact"] = secs.get("kl_both.exact", 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
            _write_atomic(pa.table({"vec_id": np.arange(start, stop, dtype=np.int64), names[0]: kl,
                                    names[1]: klr}), rows_path)
            if cols is not None:
                columns.merge_all(cols)
                merged.add(start)
                table = pa.table({"max": columns.max, "s0": columns.s0, "s1": columns.s1})
                _write_atomic(table.replace_schema_metadata({"chunks": json.dumps(sorted(merged))}), cols_path)
            secs["kl_both.write"] = secs.get("kl_both.write", 0.0) + time.perf_counter() - t0
            report.chunks_computed += 1
    out = _read_side(work, "text", n)
    out["kl_image"], out["klr_image"] = columns.kl(mean_image, n, p.b)
    return out


def mean_scores(queries: np.ndarray, cand_sum: np.ndarray, a: float, n: int, chunk: int = 65536) -> np.ndarray:
    """``a <q, sum_j v_j> / N`` for every query (the exact mean score; SPEC 3), in float64 chunks."""
    out = np.empty(len(queries))
    for s in range(0, len(queries), chunk):
        out[s : s + chunk] = np.asarray(queries[s : s + chunk], np.float64) @ cand_sum
    return a * out / n


def _cand_sum(pool: PoolIndex, modality: str) -> np.ndarray:
    try:
        return pool.stat(modality, "sum")  # sum of the normalised vectors, from the build
    except KeyError:
        from clip_density_index.queries.exact import candidate_sum

        return candidate_sum(pool.embeddings(modality))


@contextlib.contextmanager
def _forward(advance: Callable[[int], None]):
    yield advance


def _read_side(work: Path, side: str, n: int) -> dict[str, np.ndarray]:
    """The KL columns of one side from its chunk files, in vec_id order."""
    table = pq.read_table(sorted(work.glob(f"{side}-*.parquet"))).sort_by("vec_id")
    if table.num_rows != n:
        raise RuntimeError(f"{work}: expected {n} rows of {side}-side KL, found {table.num_rows}")
    return {c: table.column(c).to_numpy() for c in (f"kl_{side}", f"klr_{side}")}


# -- check ---------------------------------------------------------------------------------------


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


def _check(pool: PoolIndex, p: _Params, cols: dict[str, np.ndarray], progress: Progress,
           device: str) -> list[CheckResult]:
    from clip_density_index.queries.exact import exact_kl

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


# -- assemble ------------------------------------------------------------------------------------


def _to_arrow(values: np.ndarray) -> pa.Array:
    """float64 column; NaN (e.g. raw norms of an index without raw embeddings) becomes NULL."""
    values = np.asarray(values, dtype=np.float64)
    nan = np.isnan(values)
    return pa.array(values, mask=nan) if nan.any() else pa.array(values)


def _store_scores(pool: PoolIndex, p: _Params, cols: dict[str, np.ndarray], report: ScoreReport,
                  started: float) -> int:
    """Replace ``scores`` atomically and record the run; returns the run id."""
    import duckdb

    new = pa.table({"vec_id": np.arange(pool.n, dtype=np.int64),
                    **{c: _to_arrow(cols[c]) for c in SCORE_COLUMNS if c in cols}})
    with pool.store(read_only=False, wait=CATALOG_WAIT) as store:
        store.migrate()
        con = store.con
        old = set()
        if store.has_table("scores"):
            old = {r[0] for r in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'scores'").fetchall()}
        # identifiers come from the SCORE_COLUMNS allowlist only
        # every public column (SPEC 11) always exists, NULL until some run computes it, so
        # queries written against the SQL interface never meet a missing column
        select = []
        for c in SCORE_COLUMNS:
            if c in cols:
                select.append(f"c.{c}")
            elif c in old:
                select.append(f"o.{c}")
            else:
                select.append(f"CAST(NULL AS DOUBLE) AS {c}")
        carried = [c for c in SCORE_COLUMNS if c in old and c not in cols]
        if carried:
            log.info("keeping %s from the previous scores table", ", ".join(carried))
        # built aside and swapped in one transaction: a kill at any point leaves the old table
        # and no half-built scores__new
        report.seconds["total"] = time.perf_counter() - started
        con.register("_new_scores", new)
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("DROP TABLE IF EXISTS scores__new")
            con.execute(
                "CREATE TABLE scores__new AS SELECT s.uid, s.vec_id"
                + "".join(f", {x}" for x in select)
                + " FROM samples AS s JOIN _new_scores AS c ON c.vec_id = s.vec_id"
                + (" LEFT JOIN scores AS o ON o.vec_id = s.vec_id" if carried else "")
                + " ORDER BY s.vec_id"
            )
            rows = con.execute("SELECT count(*) FROM scores__new").fetchall()[0][0]
            if rows != pool.n:
                raise RuntimeError(f"{pool.paths.catalog}: samples has {rows} rows matching vec_id 0..{pool.n - 1}")
            con.execute("DROP TABLE IF EXISTS scores")
            con.execute("ALTER TABLE scores__new RENAME TO scores")
            run_id = store.run(
                "score_run_insert",
                created_at=datetime.now(timezone.utc).replace(tzinfo=None), exact=p.exact,
                side=next(s for s, v in SIDES.items() if v == p.sides), metrics=list(p.metrics),
                columns=report.columns, k=p.k, tail_sample=p.m, seed=p.seed, logit_scale=p.a,
                logit_bias=p.b, image_index=pool.manifest.get("image_index"),
                text_index=pool.manifest.get("text_index"),
                nprobe=next((v for v in report.nprobe.values() if v is not None), None),
                dots_per_query=json.dumps(report.dots_per_query), seconds=json.dumps(report.seconds),
                duration_s=report.seconds["total"], estimator=report.estimator, reason=report.reason,
                precision=report.precision, details=json.dumps(report.details),
            ).fetchall()[0][0]
            for r in report.checks:
                store.run("score_check_insert", run_id=run_id, column_name=r.column, n_checked=r.n,
                          seed=p.seed, spearman=r.spearman, mae=r.mae, max_abs_error=r.max_abs_error,
                          top25_overlap=r.top25_overlap, spearman_lo=r.spearman_ci[0],
                          spearman_hi=r.spearman_ci[1], top25_overlap_lo=r.top25_overlap_ci[0],
                          top25_overlap_hi=r.top25_overlap_ci[1], mae_lo=r.mae_ci[0], mae_hi=r.mae_ci[1])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.unregister("_new_scores")
        try:
            con.execute("CHECKPOINT")
        except duckdb.Error as e:  # e.g. a full disk: committed, the WAL keeps it and replays it on open
            log.warning("the scores are stored (run %s), but the catalog %s could not be checkpointed (%s); "
                        "they stay in its write-ahead log until a later write succeeds", run_id,
                        pool.paths.catalog, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return int(run_id)


# -- the command ---------------------------------------------------------------------------------


def score(
    pool_or_path: PoolIndex | str | Path,
    *,
    estimator: str = "auto",
    exact: bool = False,
    k: int | None = None,
    tail_sample: int | None = None,
    side: str = "both",
    logit_scale: float | None = None,
    logit_bias: float | None = None,
    metrics: list[str] | tuple[str, ...] | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    nprobe: int | None = None,
    check: int | None = None,
    precision: str | None = None,
    paper_sample: float = PAPER_SAMPLE,
    target_spearman: float = TARGET_SPEARMAN,
    target_overlap: float = TARGET_OVERLAP,
    strata_target: float | None = None,
    max_fraction: float | None = None,
    device: str = "auto",
    progress: Progress | None = None,
) -> ScoreReport:
    """Compute score columns for every sample of an index and store them in its ``scores`` table.

    Args:
        pool_or_path: an opened ``PoolIndex`` or the index directory.
        estimator: how the KL columns are computed (``ESTIMATORS``):
            ``"exact"``: the full softmax over the whole pool (SPEC 2), both sides from one pass;
            ``"strata"``: the candidates in lists; each query's likely lists scanned exactly (GEMMs),
            the rest by a log-normal model calibrated on exact rows of the same run (SPEC 3.2);
            ``"mimps"``: FAISS top-k head + a shared uniform tail sample (SPEC 3.1);
            ``"paper"``: the paper's DataComp filter, a softmax over a uniform sample of
            ``paper_sample`` of the pool (drawn with replacement per side);
            ``"auto"`` (default): ``exact`` or ``strata``, whichever timed sample blocks predict
            faster (exact below ``AUTO_EXACT_BELOW`` samples); ``k`` / ``tail_sample`` / ``nprobe``
            given mean ``mimps``.
        exact: the same as ``estimator="exact"``.
        k: neighbours per query (mimps; default ``DEFAULT_K``, at most N).
        tail_sample: m, the uniform tail sample size (mimps; default ``DEFAULT_TAIL``, at most N;
            0 = top-k only, which is biased).
        side: ``"both"``, ``"text"`` (a sample's caption against all images) or ``"image"``.
        logit_scale: a; default the index's (manifest).
        logit_bias: SigLIP b; default the index's (NULL for CLIP). When set, the "tau_b" formulas.
        metrics: subset of ``METRICS``; default all. ``kl``/``klr`` are per side like the
            closed-form ones; ``clipscore`` belongs to the pair.
        seed: seeds the samples (tail, paper sample, check rows).
        batch_size: queries per resumable chunk (default ``DEFAULT_BATCH``).
        nprobe: IVF lists to visit (mimps; default: the index's own setting).
        check: held-out rows per side whose exact KL the run compares with its own (Spearman,
            top-25% overlap, MAE with bootstrap intervals; stored in ``score_checks``). Every
            approximate run checks itself (default ``default_check(N)``); an exact run only when asked.
        precision: score precision of the exact work (``queries.exact.PRECISIONS``; default
            float32 on CPUs, float16 on CUDA).
        paper_sample: the ``paper`` estimator's sample, as a fraction of the pool.
        target_spearman, target_overlap: what the held-out check must show; the report says
            whether it did (``ScoreReport.targets_met``).
        strata_target: strata: the modelled share of each query's mass scanned exactly
            (default ``queries.strata.DEFAULT_TARGET``).
        max_fraction: strata: the most of the pool one query scans (default
            ``queries.strata.DEFAULT_MAX_FRACTION``).
        device: torch device for the dense parts (``"auto"``: CUDA when available).
        progress: progress hook (see ``indexer.progress``).

    Returns:
        A ``ScoreReport``.

    Raises:
        IndexNotFound: ``pool_or_path`` is not an index.
        InvalidParameter: a parameter is out of range (the message names it and its value).
        IndexBusy: build-index is replacing the index right now.
    """
    started = time.perf_counter()
    pool = as_pool(pool_or_path)
    if estimator not in ESTIMATORS:
        raise InvalidParameter(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if exact and estimator not in ("auto", "exact"):
        raise InvalidParameter(f"exact=True contradicts estimator={estimator!r}")
    if exact:
        estimator = "exact"
    mimps_options = [name for name, v in (("k", k), ("tail_sample", tail_sample), ("nprobe", nprobe)) if v is not None]
    if mimps_options and estimator in ("exact", "paper", "strata"):
        raise InvalidParameter(f"{' / '.join(mimps_options)} only apply to the mimps estimator, not {estimator}")
    strata_options = [name for name, v in (("strata_target", strata_target), ("max_fraction", max_fraction))
                      if v is not None]
    if strata_options and estimator not in ("strata", "auto") or strata_options and mimps_options:
        raise InvalidParameter(f"{' / '.join(strata_options)} only apply to the strata estimator, not "
                               f"{'mimps' if mimps_options else estimator}")
    with contextlib.ExitStack() as held:
        held.enter_context(lock.using(pool.root, "score"))  # a rebuild must not swap the index from under us
        from clip_density_index.indexer.device import resolve_device

        resolve_device(device)  # an unknown or unavailable device fails now, not after the search
        with pool.store(read_only=False, wait=CATALOG_WAIT):  # a reader that never lets go: fail now
            pass
        reason = "asked for"
        resolve = functools.partial(
            _resolve, pool, k=k, tail_sample=tail_sample, side=side, logit_scale=logit_scale,
            logit_bias=logit_bias, metrics=metrics, seed=seed, batch_size=batch_size, nprobe=nprobe, check=check,
            precision=precision, paper_sample=paper_sample, target_spearman=target_spearman,
            target_overlap=target_overlap, device=device, strata_target=strata_target, max_fraction=max_fraction)
        if estimator == "auto" and mimps_options:
            estimator, reason = "mimps", "k / tail_sample / nprobe given"
        auto_chose = estimator == "auto"  # its approximate choice falls back to exact if it misses
        if estimator == "auto":
            p = resolve(estimator="exact")
            estimator, reason = _choose(pool, p, device) if p.kl else ("exact", "")
        p = replace(resolve(estimator=estimator), reason=reason)
        report = _run(pool, p, held, progress or null_progress, device, started,
                      fallback=auto_chose and not p.exact)
        if report is None:  # auto's strata missed the targets on its held-out rows: accuracy first
            p = replace(resolve(estimator="exact"), reason=f"exact: {_MISSED.pop(str(pool.root))}")
            report = _run(pool, p, held, progress or null_progress, device, started)
        return report


def _choose(pool: PoolIndex, p: _Params, device: str) -> tuple[str, str]:
    """``auto``: exact or strata, whichever is predicted faster on this pool and machine, and why.

    Both costs come from timed sample blocks: the exact pass from one block of queries against
    every candidate (it is a sum of such blocks); strata from its plan, its calibration and one
    block of queries scanned, on the first side. MIMPS and the paper's sample are baselines,
    chosen by name.
    """
    import torch

    from clip_density_index.queries import strata
    from clip_density_index.queries.exact import exact_moments, resolve_device, stage

    n = pool.n
    if n < AUTO_EXACT_BELOW:
        return "exact", f"exact: a pool under {AUTO_EXACT_BELOW:,} samples is scored exactly in seconds"
    side = p.sides[0]
    queries, candidates = pool.embeddings(side), pool.embeddings(other_modality(side))
    rng = np.random.default_rng([p.seed, 0xA070])
    block = np.sort(rng.choice(n, size=min(n, 1024), replace=False))
    q = np.asarray(queries[block], dtype=np.float32)
    staged = candidates
    if resolve_device(device).type == "cuda":  # as the run does: staged once, the GEMMs warmed up
        staged = stage(candidates, resolve_device(device), p.precision)
        exact_moments(q[:8], staged, p.a, rows=True, cols=True, device=device, precision=p.precision)
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    exact_moments(q, staged, p.a, rows=True, cols=len(p.sides) == 2, device=device, precision=p.precision)
    if resolve_device(device).type == "cuda":
        torch.cuda.synchronize()
    exact_s = (time.perf_counter() - t0) * n / len(block)  # one pass serves both sides
    del staged
    t0 = time.perf_counter()
    plan = strata.build_plan(candidates, seed=p.seed, queries=queries)
    cal = calibration_ids(n, strata.CALIBRATION_QUERIES, p.check or default_check(n), p.seed, side)
    gamma = strata.calibrate(plan, np.asarray(queries[cal], dtype=np.float32), p.a, target=p.strata_target,
                             max_fraction=p.max_fraction, own_ids=cal)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    strata.partials(plan, q, p.a, gamma=gamma, target=p.strata_target, max_fraction=p.max_fraction,
                    own_ids=block)
    scan = (time.perf_counter() - t0) * n / len(block)
    check_s = exact_s * (p.check or default_check(n)) / n  # the held-out rows, per side
    strata_s = len(p.sides) * (setup + scan + check_s)
    how = f"predicted {exact_s:,.0f} s exact vs {strata_s:,.0f} s strata (timed sample blocks)"
    log.info("auto: %s", how)
    if exact_s <= strata_s:
        return "exact", f"exact: {how}"  # the plan (a copy of the candidates) is let go here
    _PLANS[_plan_key(pool, p, side)] = (plan, cal, gamma)  # the strata run starts with them
    return "strata", f"strata: {how}; its accuracy is checked on held-out exact rows"


def _run(pool: PoolIndex, p: _Params, held: contextlib.ExitStack, progress: Progress, device: str,
         started: float, fallback: bool = False) -> ScoreReport | None:
    """``score`` after its checks, under the index's shared lock; ``held`` keeps the run's
    chunk-folder lock until the folder is cleaned up. With ``fallback`` (auto's choice), an
    approximate run whose held-out check misses the targets stores nothing and returns None."""
    columns = [c for c in SCORE_COLUMNS
               if c == "clipscore" and "clipscore" in p.metrics
               or c.rsplit("_", 1)[0] in p.metrics and c.rsplit("_", 1)[1] in p.sides]
    report = ScoreReport(run_id=0, path=pool.root, columns=columns, n=pool.n, exact=p.exact,
                         estimator=p.estimator if p.kl else None, reason=p.reason if p.kl else "",
                         precision=p.precision if p.kl and p.estimator in ("exact", "paper") else None,
                         sides=p.sides,
                         k=p.k, m=p.m, logit_scale=p.a, logit_bias=p.b, seed=p.seed, targets=p.targets)
    cols: dict[str, np.ndarray] = {}
    work = pool.paths.work_dir(_work_name(pool, p))
    if p.kl:
        work.mkdir(parents=True, exist_ok=True)
        held.enter_context(lock.sole(work, f"A score with the same options is already running in "
                                           f"{str(pool.root)!r} (its chunks are in {work}); wait for "
                                           "it to finish"))
        log.info("scoring KL (%s: %s) of %d samples, %s; chunks in %s", p.estimator, p.reason, pool.n,
                 "+".join(p.sides), work)
        if p.exact and len(p.sides) == 2:
            t0 = time.perf_counter()
            cols.update(_kl_exact_both(pool, p, work, report, progress, device))
            report.seconds["kl_both"] = time.perf_counter() - t0
        else:
            for s in p.sides:
                t0 = time.perf_counter()
                _kl_side(pool, s, p, work, report, progress, device)
                cols.update(_read_side(work, s, pool.n))
                report.seconds[f"kl_{s}"] = time.perf_counter() - t0
                log.info("KL %s side: %.1f s", s, report.seconds[f"kl_{s}"])
        if report.chunks_reused:
            log.info("resumed: %d chunks reused from %s", report.chunks_reused, work)

    t0 = time.perf_counter()
    closed = [m for m in CLOSED_FORM_METRICS if m in p.metrics]
    if closed:
        from clip_density_index.queries.closed_form import closed_form_scores

        for s in p.sides:
            cols.update(closed_form_scores(pool, s, a=p.a, metrics=set(closed), progress=progress,
                                           precision="float32"))
    if "clipscore" in p.metrics:
        from clip_density_index.queries.closed_form import clipscore_scores

        cols["clipscore"] = clipscore_scores(pool, progress=progress)
    if closed or "clipscore" in p.metrics:
        report.seconds["closed_form"] = time.perf_counter() - t0

    if p.check:
        t0 = time.perf_counter()
        report.checks = _check(pool, p, cols, progress, device)
        report.seconds["check"] = time.perf_counter() - t0
        if fallback and report.targets_met is False:
            worst = min(report.checks, key=lambda c: (c.spearman, c.top25_overlap))
            _MISSED[str(pool.root)] = (
                f"{p.estimator} missed the targets on its held-out rows ({worst.column}: Spearman "
                f"{worst.spearman:.4f}, top-25% overlap {worst.top25_overlap:.1%}); scored exactly instead")
            log.warning("auto: %s", _MISSED[str(pool.root)])
            shutil.rmtree(work, ignore_errors=True)
            return None

    cols = {c: v for c, v in cols.items() if c in columns}
    t0 = time.perf_counter()
    report.run_id = _store_scores(pool, p, cols, report, started)
    report.seconds["store"] = time.perf_counter() - t0
    report.seconds["total"] = time.perf_counter() - started
    if work.exists():
        shutil.rmtree(work, ignore_errors=True)
        try:
            work.parent.rmdir()  # the index's work/ folder, when nothing else is in it
        except OSError:
            _note_unfinished(work.parent)
    log.info("scored %d samples: %s in %.1f s (run %d)", pool.n, ", ".join(columns),
             report.seconds["total"], report.run_id)
    return report



def _note_unfinished(folder: Path) -> None:
    """Say that interrupted runs with other options still keep their chunks (and space) in ``folder``."""
    runs = [p for p in folder.glob("score-*") if p.is_dir() and not lock.in_use(p)]  # not running ones
    if runs:
        size = sum(f.stat().st_size for p in runs for f in p.rglob("*") if f.is_file())
        log.warning("%d interrupted score run(s) with other options keep their finished chunks in %s "
                    "(%.1f MB): rerun them to resume, or delete the folder", len(runs), folder, size / 2**20)


def report_dict(report: ScoreReport) -> dict:
    """A JSON-able dict of a report (for the CLI's output)."""
    d = asdict(report)
    d["path"] = str(report.path)
    return d

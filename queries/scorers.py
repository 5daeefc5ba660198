"""One side's KL, chunk by chunk, for every estimator: what a run prepares once, and the chunk step.

``prepare_side`` runs once per side on the driver: it draws the run's samples (the paper sample,
mimps' uniform tail), builds and calibrates the strata plan, and records the side's cost in the
report; it returns a ``SideJob`` that holds every per-run constant and pickles (a Ray run puts it in
the object store once). ``bind(job, pool, device)`` opens what one process needs (the FAISS index,
a DuckDB connection) and yields ``score(queries, vec_ids, timings) -> ChunkScores``. The local
engine and the Ray tasks call the same step with the same constants, so they compute the same
numbers.

The estimators (SPEC 2, 3.1, 3.2; ``docs/METHOD.md``):
* ``exact``: the full softmax over every candidate (``queries.exact``);
* ``paper``: the same over a uniform sample drawn with replacement (the paper's DataComp filter);
* ``strata``: the candidates in lists, each query's likely lists scanned exactly, the rest by a
  log-normal model calibrated on exact rows of this run (``queries.strata``);
* ``mimps``: FAISS top-k head + one shared uniform tail sample (``queries.estimate``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.indexer.layout import MODALITIES
from clip_density_index.indexer.pool import PoolIndex
from clip_density_index.queries.accuracy import check_sample
from clip_density_index.queries.score_params import ScoreParams, other_modality
from clip_density_index.queries.score_report import ScoreReport

log = logging.getLogger(__name__)

#: Strata plans (with calibration rows and gamma) that ``auto`` built while timing, for the run.
PLANS: dict[tuple, tuple] = {}


def plan_key(pool: PoolIndex, p: ScoreParams, side: str) -> tuple:
    return (str(pool.root), pool.manifest.get("created_at"), side, p.seed, p.a, p.strata_target, p.max_fraction)


@dataclass
class ChunkScores:
    """One chunk's KL / KLR, and for strata the candidates it scanned (summed over its queries)."""

    kl: np.ndarray
    klr: np.ndarray
    scanned: float = 0.0


@dataclass
class SideJob:
    """Everything every chunk of one side needs, fixed for the run (``prepare_side``)."""

    side: str
    p: ScoreParams
    n: int
    #: per estimator: exact / paper ``candidates`` (paper: the sampled rows; exact: None, the
    #: pool's); strata ``plan``, ``gamma``; mimps ``tail_ids``, ``tail_vectors``, ``cand_sum``, ``rescored``
    constants: dict[str, Any] = field(default_factory=dict)

    @property
    def other(self) -> str:
        return other_modality(self.side)


def calibration_ids(n: int, size: int, check: int | None, seed: int, side: str) -> np.ndarray:
    """Random vec_ids whose exact rows fit the strata model, disjoint from the held-out check rows
    (SPEC 3.2); at most half of what the check leaves."""
    taken = np.zeros(n, dtype=bool)
    if check:
        taken[check_sample(n, check, seed)] = True
    free = np.flatnonzero(~taken)
    rng = np.random.default_rng([seed, 0xCA1, MODALITIES.index(side)])
    return np.sort(rng.choice(free, size=min(size, max(1, len(free) // 2)), replace=False))


def paper_sample_ids(n: int, fraction: float, seed: int, side: str) -> np.ndarray:
    """The paper's DataComp filter's candidates for one side: ``ceil(fraction * n)`` ids drawn
    uniformly WITH replacement (seeded per side); a query's own pair is not forced in."""
    m = max(1, math.ceil(fraction * n))
    return np.random.default_rng([seed, 0x9A9E5, MODALITIES.index(side)]).integers(0, n, size=m)


def mean_scores(queries: np.ndarray, cand_sum: np.ndarray, a: float, n: int, chunk: int = 65536) -> np.ndarray:
    """``a <q, sum_j v_j> / N`` for every query (the exact mean score; SPEC 3), in float64 chunks."""
    out = np.empty(len(queries))
    for s in range(0, len(queries), chunk):
        out[s : s + chunk] = np.asarray(queries[s : s + chunk], np.float64) @ cand_sum
    return a * out / n


def cand_sum(pool: PoolIndex, modality: str) -> np.ndarray:
    """``sum_j v_j`` of one modality: the build's statistic, or computed when the index lacks it."""
    try:
        return pool.stat(modality, "sum")  # sum of the normalised vectors, from the build
    except KeyError:
        from clip_density_index.queries.exact import candidate_sum

        return candidate_sum(pool.embeddings(modality))


# -- once per side, on the driver ----------------------------------------------------------------


def prepare_side(pool: PoolIndex, side: str, p: ScoreParams, report: ScoreReport, device: str) -> SideJob:
    """The side's per-run constants, with its cost (dots per query, index, nprobe) in ``report``."""
    job = SideJob(side=side, p=p, n=pool.n)
    if p.estimator in ("exact", "paper"):
        candidates = pool.embeddings(job.other)
        if p.estimator == "paper":
            candidates = np.asarray(candidates[paper_sample_ids(pool.n, p.paper_sample, p.seed, side)])
            job.constants["candidates"] = candidates
        report.dots_per_query[side] = float(len(candidates))
    elif p.estimator == "strata":
        _prepare_strata(pool, job, report)
    else:
        _prepare_mimps(pool, job, report)
    return job


def _prepare_strata(pool: PoolIndex, job: SideJob, report: ScoreReport) -> None:
    from clip_density_index.queries import strata

    p, side = job.p, job.side
    kept = PLANS.pop(plan_key(pool, p, side), None)  # built by auto's timing
    if kept is None:
        queries = pool.embeddings(side)
        t0 = time.perf_counter()
        plan = strata.build_plan(pool.embeddings(job.other), seed=p.seed, queries=queries)
        report.seconds[f"kl_{side}.plan"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cal = calibration_ids(pool.n, strata.CALIBRATION_QUERIES, p.check, p.seed, side)
        gamma = strata.calibrate(plan, np.asarray(queries[cal], dtype=np.float32), p.a, target=p.strata_target,
                                 max_fraction=p.max_fraction, own_ids=cal)
        report.seconds[f"kl_{side}.calibrate"] = time.perf_counter() - t0
    else:
        plan, cal, gamma = kept
    job.constants.update(plan=plan, gamma=gamma)
    report.details.setdefault(side, {}).update(lists=plan.n_lists, gamma=gamma, calibration_rows=len(cal),
                                               target=p.strata_target, max_fraction=p.max_fraction)


def _prepare_mimps(pool: PoolIndex, job: SideJob, report: ScoreReport) -> None:
    from clip_density_index.indexer import choose, faiss_index
    from clip_density_index.queries import estimate

    p, side, n = job.p, job.side, pool.n
    t0 = time.perf_counter()
    index = pool.faiss(job.other)
    params = faiss_index.index_params(index)
    nprobe = p.nprobe if p.nprobe is not None else params.get("nprobe")
    tail_ids = estimate.draw_tail(n, p.m, p.seed)
    job.constants.update(tail_ids=tail_ids, tail_vectors=np.asarray(pool.embeddings(job.other)[tail_ids]),
                         cand_sum=cand_sum(pool, job.other), rescored=estimate.needs_rescore(index))
    try:
        search_dots = choose.dots_per_query(params["key"], n, nprobe or 1)
    except InvalidParameter:  # HNSW: data-dependent cost
        search_dots = float("nan")
    report.index_keys[side] = params["key"]
    report.nprobe[side] = None if params.get("nlist") is None else min(nprobe, params["nlist"])
    report.rescored[side] = job.constants["rescored"]
    dots = estimate.dots_per_query(search_dots, p.k, p.m, job.constants["rescored"], own_pair=True)
    report.dots_per_query[side] = dots if math.isfinite(dots) else None  # None: not counted (HNSW)
    report.seconds[f"kl_{side}.setup"] = time.perf_counter() - t0


def finish_side(job: SideJob, report: ScoreReport, scanned: float, rows: int) -> None:
    """Strata: the share of the pool this run's chunks scanned (a resumed run counts only those it
    computed), and the dots per query that makes."""
    if job.p.estimator == "strata" and rows:
        from clip_density_index.queries import strata

        report.details[job.side]["scanned_fraction"] = scanned / rows / job.n
        report.dots_per_query[job.side] = scanned / rows + job.constants["plan"].n_lists + strata.VAR_RANK + 1


# -- the chunk step, in any process --------------------------------------------------------------

ChunkStep = Callable[[np.ndarray, np.ndarray, dict], ChunkScores]


@contextlib.contextmanager
def bind(job: SideJob, pool: PoolIndex, device: str) -> Iterator[ChunkStep]:
    """``score(queries, vec_ids, timings)`` for chunks of ``job``'s side in this process
    (``timings``: the phases' seconds are added to it, keys ``kl_<side>.<phase>``)."""
    if job.p.estimator in ("exact", "paper"):
        yield _exact_step(job, pool, device)
        return
    import duckdb

    with duckdb.connect() as con:
        if job.p.estimator == "strata":
            yield _strata_step(job, con)
        else:
            yield _mimps_step(job, pool, device, con)


def _exact_step(job: SideJob, pool: PoolIndex, device: str) -> ChunkStep:
    from clip_density_index.queries.exact import exact_kl

    p = job.p
    candidates = job.constants.get("candidates")
    candidates = pool.embeddings(job.other, checked=False) if candidates is None else candidates
    key = f"kl_{job.side}.{p.estimator}"

    def step(q: np.ndarray, ids: np.ndarray, timings: dict) -> ChunkScores:
        t0 = time.perf_counter()
        kl, klr = exact_kl(q, candidates, p.a, p.b, device=device, dtype=p.precision)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
        return ChunkScores(kl, klr)

    return step


def _strata_step(job: SideJob, con) -> ChunkStep:
    from clip_density_index.queries import strata

    p, plan, gamma, prefix = job.p, job.constants["plan"], job.constants["gamma"], f"kl_{job.side}."

    def step(q: np.ndarray, ids: np.ndarray, timings: dict) -> ChunkScores:
        t = time.perf_counter()
        part = strata.partials(plan, q, p.a, gamma=gamma, target=p.strata_target, max_fraction=p.max_fraction,
                               query_ids=ids, own_ids=ids)
        scanned = float(np.sum(part.column("scanned_n").to_numpy()))
        timings[prefix + "scan"] = timings.get(prefix + "scan", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        res = strata.strata_kl(con, part, job.n, p.b)
        timings[prefix + "sql"] = timings.get(prefix + "sql", 0.0) + time.perf_counter() - t
        return ChunkScores(res.column("kl").to_numpy(), res.column("klr").to_numpy(), scanned)

    return step


def _mimps_step(job: SideJob, pool: PoolIndex, device: str, con) -> ChunkStep:
    from clip_density_index.indexer import faiss_index
    from clip_density_index.queries import estimate
    from clip_density_index.indexer.device import resolve_device

    p, c = job.p, job.constants
    index = pool.faiss(job.other)
    if resolve_device(device).type == "cuda" and faiss_index.gpu_available() and p.k <= 2048:
        try:  # search on the GPU (FAISS GPU indexes return at most 2048 neighbours)
            index = faiss_index.to_gpu(index)
        except (RuntimeError, InvalidParameter) as e:
            log.warning("searching the %s index on the CPU: it cannot move to the GPU (%s)", job.other, e)
    candidates = pool.embeddings(job.other, checked=False)
    constants = dict(tail_ids=c["tail_ids"], tail_vectors=c["tail_vectors"], cand_sum=c["cand_sum"])

    def step(q: np.ndarray, ids: np.ndarray, timings: dict) -> ChunkScores:
        res = estimate.estimate_kl(
            index, q, candidates, p.k, p.a, p.b, nprobe=p.nprobe, rescore=c["rescored"], query_ids=ids,
            own_ids=ids, con=con, device=device, timings=timings, prefix=f"kl_{job.side}.", **constants,
        )
        if not np.array_equal(res.column("query").to_numpy(), ids):
            raise RuntimeError(f"kl_per_sample returned queries out of order for vec_ids {ids[0]}..{ids[-1]}")
        return ChunkScores(res.column("kl").to_numpy(), res.column("klr").to_numpy())

    return step

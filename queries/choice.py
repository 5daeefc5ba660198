"""``auto``: exact or strata, whichever timed sample blocks predict faster on this pool and machine.

Both costs come from timed sample blocks: the exact pass from one block of queries against every
candidate (it is a sum of such blocks); strata from its plan, its calibration and one block of
queries scanned, on the first side. MIMPS and the paper's sample are baselines, chosen by name.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from clip_density_index.indexer.pool import PoolIndex
from clip_density_index.queries.score_params import ScoreParams, default_check, other_modality
from clip_density_index.queries.scorers import PLANS, calibration_ids, plan_key

log = logging.getLogger(__name__)

#: Queries of the timed sample block.
SAMPLE_BLOCK = 1024


def choose(pool: PoolIndex, p: ScoreParams, device: str, exact_below: int) -> tuple[str, str]:
    """The estimator ``auto`` runs (``"exact"`` or ``"strata"``) and why. Pools under
    ``exact_below`` samples are scored exactly without timing anything. A strata choice keeps the
    plan it timed (``queries.scorers.PLANS``) for the run."""
    n = pool.n
    if n < exact_below:
        return "exact", f"exact: a pool under {exact_below:,} samples is scored exactly in seconds"
    side = p.sides[0]
    rng = np.random.default_rng([p.seed, 0xA070])
    block = np.sort(rng.choice(n, size=min(n, SAMPLE_BLOCK), replace=False))
    q = np.asarray(pool.embeddings(side)[block], dtype=np.float32)
    exact_s = _exact_seconds(pool, p, device, q) * n / len(block)  # one pass serves both sides
    setup, scan, kept = _strata_seconds(pool, p, side, q, block)
    check_s = exact_s * (p.check or default_check(n)) / n  # the held-out rows, per side
    strata_s = len(p.sides) * (setup + scan * n / len(block) + check_s)
    how = f"predicted {exact_s:,.0f} s exact vs {strata_s:,.0f} s strata (timed sample blocks)"
    log.info("auto: %s", how)
    if exact_s <= strata_s:
        return "exact", f"exact: {how}"  # the plan (a copy of the candidates) is let go here
    PLANS[plan_key(pool, p, side)] = kept  # the strata run starts with them
    return "strata", f"strata: {how}; its accuracy is checked on held-out exact rows"


def _exact_seconds(pool: PoolIndex, p: ScoreParams, device: str, q: np.ndarray) -> float:
    """Seconds of one block of the exact pass, as the run pays it (on a GPU: staged, warmed up)."""
    import torch

    from clip_density_index.indexer.device import resolve_device
    from clip_density_index.queries.exact import exact_moments, stage

    side = p.sides[0]
    staged = pool.embeddings(other_modality(side))
    cuda = resolve_device(device).type == "cuda"
    if cuda:  # as the run does: staged once, the GEMMs warmed up
        staged = stage(staged, resolve_device(device), p.precision)
        exact_moments(q[:8], staged, p.a, rows=True, cols=True, device=device, precision=p.precision)
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    exact_moments(q, staged, p.a, rows=True, cols=len(p.sides) == 2, device=device, precision=p.precision)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _strata_seconds(pool: PoolIndex, p: ScoreParams, side: str, q: np.ndarray,
                    block: np.ndarray) -> tuple[float, float, tuple]:
    """Seconds of strata's setup (plan + calibration) and of one block scanned, and the
    ``(plan, calibration ids, gamma)`` it built."""
    from clip_density_index.queries import strata

    n, queries = pool.n, pool.embeddings(side)
    t0 = time.perf_counter()
    plan = strata.build_plan(pool.embeddings(other_modality(side)), seed=p.seed, queries=queries)
    cal = calibration_ids(n, strata.CALIBRATION_QUERIES, p.check or default_check(n), p.seed, side)
    gamma = strata.calibrate(plan, np.asarray(queries[cal], dtype=np.float32), p.a, target=p.strata_target,
                             max_fraction=p.max_fraction, own_ids=cal)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    strata.partials(plan, q, p.a, gamma=gamma, target=p.strata_target, max_fraction=p.max_fraction,
                    own_ids=block)
    return setup, time.perf_counter() - t0, (plan, cal, gamma)

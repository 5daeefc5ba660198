"""``score``: every score column of SPEC 11 for a built index, into the catalog's ``scores`` table.

* KL columns (``kl_*``, ``klr_*``): an estimator (``queries.scorers``; ``auto`` chooses with
  ``queries.choice``), queries in chunks of ``batch_size``; each finished chunk is written under
  the run's work folder (``queries.chunks``), so a rerun with the same parameters after an
  interruption skips the chunks already done: in this process (``queries.kl_local``) or as tasks
  of an engine such as a Ray cluster (``queries.kl_engine``), with the same numbers.
* Closed-form columns (``dc``, ``dw``, ``rawnorm``, ``conformity``, ``conformity_est``, ``loglik``,
  ``clipscore``): ``queries.closed_form`` (O(n d)).
* ``check=N``: exact KL on N random samples (seeded), compared with the approximate values
  (Spearman, mean absolute error, top-25% overlap; ``queries.accuracy``); reported and stored in
  ``score_checks``.

Every column is a float64 file in the run's work folder, written through a memory map
(``queries.columns``: the KL columns copied chunk by chunk from the chunk files, the closed-form
ones block by block), so the process holds blocks of rows, not columns of n. The new ``scores``
table is built from them in row ranges and swapped in atomically with the run's records
(``queries.score_store``). The work directory is deleted after success.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from clip_density_index.indexer import defaults, lock
from clip_density_index.indexer.engine import engine_for
from clip_density_index.indexer.pool import PoolIndex, as_pool
from clip_density_index.indexer.progress import Progress, null_progress
from clip_density_index.queries import chunks, columns
from clip_density_index.queries.accuracy import held_out_check
from clip_density_index.queries.columns import Columns
from clip_density_index.queries.score_params import (CLOSED_FORM_METRICS, PAPER_SAMPLE, TARGET_OVERLAP,
                                                     TARGET_SPEARMAN, ScoreParams, check_estimator_options,
                                                     resolve_params, work_name)
from clip_density_index.queries.score_report import ScoreReport
from clip_density_index.queries.score_store import CATALOG_WAIT, store_scores

log = logging.getLogger(__name__)


class _Missed(Exception):
    """auto's approximate run missed the targets on its held-out rows; the message says how."""


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
    engine: str | Any = "local",
    address: str | None = None,
    progress: Progress | None = None,
) -> ScoreReport:
    """Compute score columns for every sample of an index and store them in its ``scores`` table.

    The names of the parameters' values and their defaults (``ESTIMATORS``, ``METRICS``,
    ``DEFAULT_K``, ...) are ``queries.score_params``'s; ``AUTO_EXACT_BELOW`` is ``indexer.defaults``'.

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
        engine: where the KL chunks run (``indexer.engine``): ``"local"`` (this process) or
            ``"ray"`` (tasks on a Ray cluster; the index on a path every node reads, or a URI), or an
            engine already open (``indexer.engine.open_engine``). The same estimators, parameters
            and numbers either way; the driver (this process) plans, checks and stores.
        address: the Ray cluster (``"auto"``, ``host:port``, ``ray://...``); default a local
            cluster of this machine's CPUs. Only with ``engine="ray"``.
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
    mimps_given = [name for name, v in (("k", k), ("tail_sample", tail_sample), ("nprobe", nprobe)) if v is not None]
    strata_given = [name for name, v in (("strata_target", strata_target), ("max_fraction", max_fraction))
                    if v is not None]
    estimator = check_estimator_options(estimator, exact, mimps_given, strata_given)
    progress = progress or null_progress
    with contextlib.ExitStack() as held:
        _start(pool, held, device)
        resolve = functools.partial(
            resolve_params, pool, k=k, tail_sample=tail_sample, side=side, logit_scale=logit_scale,
            logit_bias=logit_bias, metrics=metrics, seed=seed, batch_size=batch_size, nprobe=nprobe, check=check,
            precision=precision, paper_sample=paper_sample, target_spearman=target_spearman,
            target_overlap=target_overlap, device=device, strata_target=strata_target, max_fraction=max_fraction)
        reason = "asked for"
        if estimator == "auto" and mimps_given:
            estimator, reason = "mimps", "k / tail_sample / nprobe given"
        auto_chose = estimator == "auto"  # its approximate choice falls back to exact if it misses
        if auto_chose:
            p = resolve(estimator="exact")
            estimator, reason = _choose(pool, p, device) if p.kl else ("exact", "")
        p = replace(resolve(estimator=estimator), reason=reason)
        run = functools.partial(_run, pool, held=held, progress=progress, device=device, started=started,
                                engine=held.enter_context(engine_for(engine, address)))
        try:
            return run(p, fallback=auto_chose and not p.exact)
        except _Missed as missed:  # auto's strata missed the targets on its held-out rows: accuracy first
            return run(replace(resolve(estimator="exact"), reason=f"exact: {missed}"))


def _start(pool: PoolIndex, held: contextlib.ExitStack, device: str) -> None:
    """Take the index's shared lock (a rebuild must not swap the index from under the run) and
    fail now, not after the work, on an unknown device or a catalog another process keeps open."""
    from clip_density_index.indexer.device import resolve_device

    held.enter_context(lock.using(pool.root, "score"))
    resolve_device(device)
    with pool.store(read_only=False, wait=CATALOG_WAIT):  # a reader that never lets go: fail now
        pass


def _choose(pool: PoolIndex, p: ScoreParams, device: str) -> tuple[str, str]:
    """``auto``: exact or strata, and why (``queries.choice``)."""
    from clip_density_index.queries.choice import choose

    return choose(pool, p, device, exact_below=defaults.AUTO_EXACT_BELOW)


def _run(pool: PoolIndex, p: ScoreParams, *, held: contextlib.ExitStack, progress: Progress, device: str,
         started: float, engine, fallback: bool = False) -> ScoreReport:
    """``score`` after its checks, under the index's shared lock; ``held`` keeps the run's
    work-folder lock until the folder is cleaned up. The columns are files in the work folder
    (``queries.columns``), removed when the run ends. With ``fallback`` (auto's choice), an
    approximate run whose held-out check misses the targets stores nothing and raises ``_Missed``."""
    report = ScoreReport.start(pool, p, engine=engine.name)
    work = pool.paths.work_dir(work_name(pool, p))
    work.mkdir(parents=True, exist_ok=True)
    held.enter_context(lock.sole(work, f"A score with the same options is already running in "
                                       f"{str(pool.root)!r} (its work folder is {work}); wait for "
                                       "it to finish"))
    with Columns(work / columns.FOLDER, pool.n) as cols:
        if p.kl:
            _kl_columns(pool, p, work, cols, report, progress, device, engine)
        _closed_form_columns(pool, p, cols, report, progress)
        if p.check:
            t0 = time.perf_counter()
            report.checks = held_out_check(pool, p, cols, progress, device)
            report.seconds["check"] = time.perf_counter() - t0
            if fallback and report.targets_met is False:
                worst = min(report.checks, key=lambda c: (c.spearman, c.top25_overlap))
                missed = (f"{p.estimator} missed the targets on its held-out rows ({worst.column}: Spearman "
                          f"{worst.spearman:.4f}, top-25% overlap {worst.top25_overlap:.1%}); scored exactly "
                          "instead")
                log.warning("auto: %s", missed)
                chunks.remove_run(work)
                raise _Missed(missed)
        t0 = time.perf_counter()
        report.run_id = store_scores(pool, p, {c: v for c, v in cols.items() if c in report.columns}, report,
                                     started)
        report.seconds["store"] = time.perf_counter() - t0
        report.seconds["total"] = time.perf_counter() - started
    chunks.remove(work)
    log.info("scored %d samples: %s in %.1f s (run %d)", pool.n, ", ".join(report.columns),
             report.seconds["total"], report.run_id)
    return report


def _kl_columns(pool: PoolIndex, p: ScoreParams, work: Path, cols: Columns, report: ScoreReport,
                progress: Progress, device: str, engine) -> None:
    """The KL columns of every side asked for, into ``cols``: computed or reused chunk by chunk in
    ``work`` (held locked by this run), in this process (``queries.kl_local``), or as tasks of
    ``engine`` (``queries.kl_engine``), then copied from the chunk files."""
    from clip_density_index.queries import kl_engine, kl_local

    both, side = kl_local.kl_exact_both, kl_local.kl_side
    if engine.name != "local":
        both, side = functools.partial(kl_engine.kl_exact_both, engine), functools.partial(kl_engine.kl_side, engine)

    log.info("scoring KL (%s: %s) of %d samples, %s, %s engine; chunks in %s", p.estimator, p.reason, pool.n,
             "+".join(p.sides), engine.name, work)
    if p.exact and len(p.sides) == 2:
        t0 = time.perf_counter()
        both(pool, p, work, report, progress, device, cols.new)
        report.seconds["kl_both"] = time.perf_counter() - t0
    else:
        for s in p.sides:
            t0 = time.perf_counter()
            side(pool, s, p, work, report, progress, device)
            chunks.read_side(work, s, pool.n, cols.new)
            report.seconds[f"kl_{s}"] = time.perf_counter() - t0
            log.info("KL %s side: %.1f s", s, report.seconds[f"kl_{s}"])
    if report.chunks_reused:
        log.info("resumed: %d chunks reused from %s", report.chunks_reused, work)


def _closed_form_columns(pool: PoolIndex, p: ScoreParams, cols: Columns, report: ScoreReport,
                         progress: Progress) -> None:
    """The closed-form columns asked for (``queries.closed_form``, O(n d)), into ``cols``."""
    t0 = time.perf_counter()
    closed = [m for m in CLOSED_FORM_METRICS if m in p.metrics]
    if closed:
        from clip_density_index.queries.closed_form import closed_form_scores

        for s in p.sides:
            closed_form_scores(pool, s, a=p.a, metrics=set(closed), progress=progress, precision="float32",
                               column=cols.new)
    if "clipscore" in p.metrics:
        from clip_density_index.queries.closed_form import clipscore_scores

        clipscore_scores(pool, progress=progress, column=cols.new)
    if closed or "clipscore" in p.metrics:
        report.seconds["closed_form"] = time.perf_counter() - t0

"""Storing a score run: the new ``scores`` table swapped in atomically, with its run records.

Every public score column (SPEC 11) always exists in ``scores``, NULL until some run computes it,
so queries written against the SQL interface never meet a missing column; columns of the older
table that this run did not compute are carried over. The table is built aside, ``STORE_ROWS`` rows
at a time read from the run's columns (memory maps of its column files, ``queries.columns``), and
swapped in one transaction together with the ``score_runs`` (and ``score_checks``) rows
(``Store.replace_scores``).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from typing import Iterator, Mapping

import numpy as np
import pyarrow as pa

from clip_density_index.indexer.pool import PoolIndex
from clip_density_index.indexer.store import Store
from clip_density_index.queries.score_params import SCORE_COLUMNS, SIDES, ScoreParams
from clip_density_index.queries.score_report import ScoreReport

log = logging.getLogger(__name__)

#: Seconds ``score`` waits for another process (a long ``sql``, a notebook's kept reader) to let go
#: of the catalog before it writes, at the start and for the final write.
CATALOG_WAIT = 120.0


#: Rows of the new ``scores`` table inserted per statement: each range's columns are read from the
#: run's column files into one Arrow table (262,144 rows x 17 float64 columns and vec_id: 38 MB),
#: so the store step holds a range, not the table. At 800k rows (d 64, 13 columns) ranges of
#: 2^16, 2^18 and 2^20 rows stored in 1.5, 1.7 and 2.0 s: smaller ranges cost no time there.
STORE_ROWS = 1 << 18


def to_arrow(values: np.ndarray) -> pa.Array:
    """float64 column; NaN (e.g. raw norms of an index without raw embeddings) becomes NULL."""
    values = np.asarray(values, dtype=np.float64)
    nan = np.isnan(values)
    return pa.array(values, mask=nan) if nan.any() else pa.array(values)


def row_ranges(cols: Mapping[str, np.ndarray], n: int) -> Iterator[tuple[int, int, pa.Table]]:
    """``(lo, hi, table)`` for rows ``lo..hi`` of every ``STORE_ROWS`` (at least one range, empty
    for an empty pool): ``vec_id`` and the computed columns, in ``SCORE_COLUMNS`` order."""
    computed = [c for c in SCORE_COLUMNS if c in cols]
    for lo in range(0, max(n, 1), STORE_ROWS):
        hi = min(lo + STORE_ROWS, n)
        yield lo, hi, pa.table({"vec_id": np.arange(lo, hi, dtype=np.int64),
                                **{c: to_arrow(cols[c][lo:hi]) for c in computed}})


def store_scores(pool: PoolIndex, p: ScoreParams, cols: Mapping[str, np.ndarray], report: ScoreReport,
                 started: float) -> int:
    """Replace ``scores`` atomically and record the run; returns the run id. ``cols``: the
    computed columns, (n,) float64 arrays or memory maps, read ``STORE_ROWS`` rows at a time."""
    with pool.store(read_only=False, wait=CATALOG_WAIT) as store:
        store.migrate()
        old = {name for name, _ in store.columns("scores")}
        sources = {c: "new" if c in cols else "old" if c in old else "null" for c in SCORE_COLUMNS}
        carried = [c for c, s in sources.items() if s == "old"]
        if carried:
            log.info("keeping %s from the previous scores table", ", ".join(carried))
        report.seconds["total"] = time.perf_counter() - started
        run_id = store.replace_scores(row_ranges(cols, pool.n), sources, SCORE_COLUMNS, pool.n,
                                      lambda: _record(store, pool, p, report))
        failed = store.checkpoint()
        if failed:  # e.g. a full disk: committed, the WAL keeps it and replays it on open
            log.warning("the scores are stored (run %s), but the catalog %s could not be checkpointed (%s); "
                        "they stay in its write-ahead log until a later write succeeds", run_id,
                        pool.paths.catalog, failed)
    return int(run_id)


def _record(store: Store, pool: PoolIndex, p: ScoreParams, report: ScoreReport) -> int:
    """The run's ``score_runs`` row and its ``score_checks`` rows; returns the run id."""
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
    return int(run_id)

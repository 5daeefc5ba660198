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
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexer import lock
from indexer.choose import SCORE_TAIL
from indexer.errors import InvalidParameter
from indexer.layout import MODALITIES
from indexer.pool import PoolIndex, as_pool
from indexer.progress import Progress, null_progress
from indexer.validate import check_seed

log = logging.getLogger(__name__)

#: Defaults of the estimator (SPEC 3), tuned by the benchmarks (``bench/``): neighbours per query
#: and the size of the uniform tail sample (defined beside the default nprobe, whose dot-product
#: budget counts it: ``indexer.choose.SCORE_TAIL``).
DEFAULT_K = 256
DEFAULT_TAIL = SCORE_TAIL
#: Queries per resumable chunk.
DEFAULT_BATCH = 65536
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


@dataclass
class CheckResult:
    """Approximate vs exact values of one KL column on ``n`` random samples."""

    column: str
    n: int
    spearman: float
    mae: float
    max_abs_error: float
    top25_overlap: float


@dataclass
class ScoreReport:
    """What a ``score`` run computed, with what parameters, and how long it took."""

    run_id: int
    path: Path
    columns: list[str]
    n: int
    exact: bool
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

    @property
    def total_seconds(self) -> float:
        return self.seconds.get("total", sum(self.seconds.values()))


def other_modality(modality: str) -> str:
    return MODALITIES[1 - MODALITIES.index(modality)]


# -- parameters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Params:
    exact: bool
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

    @property
    def kl(self) -> bool:
        return any(m in KL_METRICS for m in self.metrics)


def _resolve(pool: PoolIndex, *, exact, k, tail_sample, side, logit_scale, logit_bias, metrics, seed,
             batch_size, nprobe, check) -> _Params:
    """Defaults from the index, and every value checked; raises ``InvalidParameter`` naming it."""
    n = pool.n
    if side not in SIDES:
        raise InvalidParameter(f"side must be one of {', '.join(SIDES)}; got {side!r}")
    if metrics is None:
        metrics = METRICS
    elif isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise InvalidParameter(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    if not metrics:
        raise InvalidParameter("metrics is empty; choose from " + ", ".join(METRICS))
    metrics = tuple(m for m in METRICS if m in set(metrics))
    a = pool.logit_scale if logit_scale is None else logit_scale
    if not (isinstance(a, (int, float)) and math.isfinite(a) and a > 0):
        raise InvalidParameter(f"logit_scale must be a positive number, got {a!r}")
    b = pool.logit_bias if logit_bias is None else logit_bias
    if b is not None and not math.isfinite(b):
        raise InvalidParameter(f"logit_bias must be a finite number, got {b!r}")
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
    if check is not None and not 1 <= check <= n:
        raise InvalidParameter(f"check must be between 1 and N={n} (the pool size), got {check}")
    if check is not None and not any(m in KL_METRICS for m in metrics):
        raise InvalidParameter(f"check={check} compares kl/klr columns, but metrics {list(metrics)} has neither")
    approx = not exact and any(m in KL_METRICS for m in metrics)
    if approx:
        k = min(DEFAULT_K, n) if k is None else int(k)
        m = min(DEFAULT_TAIL, n) if tail_sample is None else int(tail_sample)
    else:
        k = m = None
    return _Params(
        exact=bool(exact), sides=SIDES[side], metrics=metrics, k=k, m=m, a=float(a),
        b=None if b is None else float(b), seed=int(seed), batch_size=int(batch_size or DEFAULT_BATCH),
        nprobe=None if nprobe is None else int(nprobe), check=None if check is None else int(check),
    )


def _work_name(pool: PoolIndex, p: _Params) -> str:
    """``score-<hash>``: the parameters that determine the KL chunk files' contents."""
    key = {
        "n": pool.n, "created_at": str(pool.manifest.get("created_at")),
        "index": [pool.manifest.get("image_index"), pool.manifest.get("text_index")],
        "exact": p.exact, "k": p.k, "m": p.m, "a": p.a, "b": p.b, "seed": p.seed,
        "batch_size": p.batch_size, "nprobe": p.nprobe,
    }
    return "score-" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# -- KL chunks -----------------------------------------------------------------------------------


def _chunk_path(work: Path, side: str, start: int) -> Path:
    return work / f"{side}-{start:012d}.parquet"


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


@contextlib.contextmanager
def _chunk_scorer(pool: PoolIndex, side: str, p: _Params, report: ScoreReport,
                  device: str) -> Iterator[Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]]:
    """Set up one side's KL computation; yields ``f(queries, vec_ids) -> (kl, klr)`` for a chunk.

    Records the side's cost (dot products per query), index key, nprobe and rescoring in ``report``.
    """
    import duckdb

    from indexer import choose, faiss_index
    from queries import estimate
    from queries.exact import exact_kl, resolve_device

    n, other, secs = pool.n, other_modality(side), report.seconds
    candidates = pool.embeddings(other)
    if p.exact:
        report.dots_per_query[side] = float(n)

        def exact_chunk(q: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            t0 = time.perf_counter()
            out = exact_kl(q, candidates, p.a, p.b, device=device)
            secs[f"kl_{side}.exact"] = secs.get(f"kl_{side}.exact", 0.0) + time.perf_counter() - t0
            return out

        yield exact_chunk
        return

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
    try:
        cand_sum = pool.stat(other, "sum")  # sum of the normalised vectors, from the build
    except KeyError:
        cand_sum = estimate.candidate_sum(candidates)
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
    with _chunk_scorer(pool, side, p, report, device) as score_chunk, \
            progress(f"KL scores ({side} side)", n) as advance:
        for start in range(0, n, p.batch_size):
            stop = min(start + p.batch_size, n)
            path = _chunk_path(work, side, start)
            if path.is_file():
                report.chunks_reused += 1
            else:
                ids = np.arange(start, stop, dtype=np.int64)
                kl, klr = score_chunk(np.asarray(queries[start:stop], dtype=np.float32), ids)
                t0 = time.perf_counter()
                _write_atomic(pa.table({"vec_id": ids, f"kl_{side}": kl, f"klr_{side}": klr}), path)
                secs[f"kl_{side}.write"] = secs.get(f"kl_{side}.write", 0.0) + time.perf_counter() - t0
                report.chunks_computed += 1
            advance(stop - start)


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


def compare(column: str, approx: np.ndarray, exact: np.ndarray) -> CheckResult:
    """Agreement statistics of approximate vs exact values of one column."""
    err = np.abs(np.asarray(approx) - np.asarray(exact))
    return CheckResult(column=column, n=len(exact), spearman=spearman(approx, exact), mae=float(err.mean()),
                       max_abs_error=float(err.max()), top25_overlap=top_overlap(approx, exact))


def check_sample(n: int, size: int, seed: int) -> np.ndarray:
    """The vec_ids ``check`` compares: ``size`` distinct ids, seeded independently of the tail."""
    return np.sort(np.random.default_rng([seed, 0xC0FFEE]).choice(n, size=size, replace=False))


def _check(pool: PoolIndex, p: _Params, cols: dict[str, np.ndarray], progress: Progress,
           device: str) -> list[CheckResult]:
    from queries.exact import exact_kl

    ids = check_sample(pool.n, p.check, p.seed)
    out = []
    for side in p.sides:
        q = np.asarray(pool.embeddings(side)[ids])
        kl, klr = exact_kl(q, pool.embeddings(other_modality(side)), p.a, p.b, device=device,
                           progress=progress)
        for metric, exact_values in (("kl", kl), ("klr", klr)):
            col = f"{metric}_{side}"
            if col in cols:
                out.append(compare(col, cols[col][ids], exact_values))
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
        # built aside on a cursor of its own (a DuckDB connection with a pending result refuses
        # to register arrow tables)
        with con.cursor() as cur:
            cur.register("_new_scores", new)
            cur.execute("DROP TABLE IF EXISTS scores__new")
            cur.execute(
                "CREATE TABLE scores__new AS SELECT s.uid, s.vec_id"
                + "".join(f", {x}" for x in select)
                + " FROM samples AS s JOIN _new_scores AS c ON c.vec_id = s.vec_id"
                + (" LEFT JOIN scores AS o ON o.vec_id = s.vec_id" if carried else "")
                + " ORDER BY s.vec_id"
            )
            cur.unregister("_new_scores")
        rows = con.execute("SELECT count(*) FROM scores__new").fetchall()[0][0]
        if rows != pool.n:
            con.execute("DROP TABLE scores__new")
            raise RuntimeError(f"{pool.paths.catalog}: samples has {rows} rows matching vec_id 0..{pool.n - 1}")
        report.seconds["total"] = time.perf_counter() - started
        con.execute("BEGIN TRANSACTION")
        try:
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
                duration_s=report.seconds["total"],
            ).fetchall()[0][0]
            for r in report.checks:
                store.run("score_check_insert", run_id=run_id, column_name=r.column, n_checked=r.n,
                          seed=p.seed, spearman=r.spearman, mae=r.mae, max_abs_error=r.max_abs_error,
                          top25_overlap=r.top25_overlap)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("CHECKPOINT")
    return int(run_id)


# -- the command ---------------------------------------------------------------------------------


def score(
    pool_or_path: PoolIndex | str | Path,
    *,
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
    device: str = "auto",
    progress: Progress | None = None,
) -> ScoreReport:
    """Compute score columns for every sample of an index and store them in its ``scores`` table.

    Args:
        pool_or_path: an opened ``PoolIndex`` or the index directory.
        exact: compute the KL columns exactly over the whole pool (N dot products per query)
            instead of the top-k + tail estimate. When both indexes are ``Flat`` (small pools)
            and neither ``k`` nor ``tail_sample`` is given, the exact softmax is used anyway: the
            Flat search alone already costs N dot products per query.
        k: neighbours per query (default ``DEFAULT_K``, at most N).
        tail_sample: m, the uniform tail sample size (default ``DEFAULT_TAIL``, at most N; 0 = top-k
            only, which is biased).
        side: ``"both"``, ``"text"`` (a sample's caption against all images) or ``"image"``.
        logit_scale: a; default the index's (manifest).
        logit_bias: SigLIP b; default the index's (NULL for CLIP). When set, the "tau_b" formulas.
        metrics: subset of ``METRICS``; default all. ``kl``/``klr`` are per side like the
            closed-form ones; ``clipscore`` belongs to the pair.
        seed: seeds the tail sample and the ``check`` sample.
        batch_size: queries per resumable chunk (default ``DEFAULT_BATCH``).
        nprobe: IVF lists to visit (default: the index's own setting).
        check: compare with exact KL on this many random samples (stored in ``score_checks``).
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
    with contextlib.ExitStack() as held:
        held.enter_context(lock.using(pool.root, "score"))  # a rebuild must not swap the index from under us
        if not exact and k is None and tail_sample is None and _flat_only(pool):
            # A Flat search already spends N dot products per query: the exact softmax costs no more
            # (the estimator would cost N + m) and is the truth.
            log.info("Flat indexes: computing the exact KL (no cheaper than the search); "
                     "pass k or tail_sample to force the estimator")
            exact = True
        p = _resolve(pool, exact=exact, k=k, tail_sample=tail_sample, side=side, logit_scale=logit_scale,
                     logit_bias=logit_bias, metrics=metrics, seed=seed, batch_size=batch_size, nprobe=nprobe,
                     check=check)
        from indexer.device import resolve_device

        resolve_device(device)  # an unknown or unavailable device fails now, not after the search
        with pool.store(read_only=False, wait=CATALOG_WAIT):  # a reader that never lets go: fail now
            pass
        return _run(pool, p, held, progress or null_progress, device, started)


def _run(pool: PoolIndex, p: _Params, held: contextlib.ExitStack, progress: Progress, device: str,
         started: float) -> ScoreReport:
    """``score`` after its checks, under the index's shared lock; ``held`` keeps the run's
    chunk-folder lock until the folder is cleaned up."""
    columns = [c for c in SCORE_COLUMNS
               if c == "clipscore" and "clipscore" in p.metrics
               or c.rsplit("_", 1)[0] in p.metrics and c.rsplit("_", 1)[1] in p.sides]
    report = ScoreReport(run_id=0, path=pool.root, columns=columns, n=pool.n, exact=p.exact, sides=p.sides,
                         k=p.k, m=p.m, logit_scale=p.a, logit_bias=p.b, seed=p.seed)
    cols: dict[str, np.ndarray] = {}
    work = pool.paths.work_dir(_work_name(pool, p))
    if p.kl:
        work.mkdir(parents=True, exist_ok=True)
        held.enter_context(lock.sole(work, f"A score with the same options is already running in "
                                           f"{str(pool.root)!r} (its chunks are in {work}); wait for "
                                           "it to finish"))
        log.info("scoring KL (%s) of %d samples, %s; chunks in %s", "exact" if p.exact else
                 f"k={p.k}, m={p.m}", pool.n, "+".join(p.sides), work)
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
        from queries.closed_form import closed_form_scores

        for s in p.sides:
            cols.update(closed_form_scores(pool, s, a=p.a, metrics=set(closed), progress=progress,
                                           precision="float32"))
    if "clipscore" in p.metrics:
        from queries.closed_form import clipscore_scores

        cols["clipscore"] = clipscore_scores(pool, progress=progress)
    if closed or "clipscore" in p.metrics:
        report.seconds["closed_form"] = time.perf_counter() - t0

    if p.check:
        t0 = time.perf_counter()
        report.checks = _check(pool, p, cols, progress, device)
        report.seconds["check"] = time.perf_counter() - t0

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


def _flat_only(pool: PoolIndex) -> bool:
    """Whether both FAISS indexes of ``pool`` are exact flat scans."""
    return all(str(pool.manifest.get(f"{m}_index", "")).split(",")[0] == "Flat" for m in ("image", "text"))


def report_dict(report: ScoreReport) -> dict:
    """A JSON-able dict of a report (for the CLI's output)."""
    d = asdict(report)
    d["path"] = str(report.path)
    return d

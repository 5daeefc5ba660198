"""Stratified estimate of D_KL and D_KLR: exact scanned lists + a calibrated log-normal model of the rest.

SPEC 3.2 ("strata" and "model tails"). The candidates are partitioned into L lists (k-means, in a
query-aware metric when a sample of the queries is given). For a query q with ``s_j = a <q, v_j>``:

* every list gets a modelled mass, log-normal in its scores::

      log M_l(q) = log |l| + a <q, mu_l> + gamma a^2 var_l(q) / 2

  with ``mu_l`` the list's mean vector and ``var_l(q) = q' S_l q`` its within-list variance along q
  (``S_l`` kept as per-list variances along the top ``r`` directions of the pooled within-list
  covariance plus an isotropic rest: ``r`` dot products per query, the same for every list);
* the lists are scanned in order of modelled mass (with the log-normal's own scale
  ``PROBE_GAMMA = 1``, so that the calibration cannot buy accuracy by scanning more) until the
  modelled scanned share reaches ``target`` (or ``max_fraction`` of N is spent), plus the list of
  the query's own pair when ``own_ids`` are given. Every scanned pair is computed exactly, list-major:
  all queries of a batch that probe a list are ONE GEMM against that list's contiguous block, which
  is what keeps the work at BLAS speed (gathered per-query rescoring is memory bound, BENCHMARKS.md);
* the unscanned lists contribute their modelled ``sum e^s = M_l`` and ``sum e^s s = M_l (a <q, mu_l>
  + gamma a^2 var_l(q))`` (the moments of a log-normal);
* ``mean_s = a <q, sum_j v_j> / N`` is exact (it is linear).

``gamma`` is the one fitted constant: :func:`calibrate` computes the exact per-list sums of a random
set of calibration queries in the same run and picks the gamma whose estimates are closest to their
exact KL / KLR under the same probing rule (SPEC 3.2: never a constant from another pool). One
pooled scale, because per-list fitted log-normals collapse on the heavy-tailed synthetic worlds
where one scale holds.

Consistency (SPEC 3.2): with ``target >= 1`` and ``max_fraction >= 1`` every list is scanned, the
model part is zero and the result is section 2's exact KL (float64 mode agrees with
``queries.exact.exact_kl`` to ~1e-12).

Usage for one side (queries = the other modality)::

    plan = build_plan(candidates, seed=0, queries=query_sample)
    gamma = calibrate(plan, calib_queries, a, own_ids=calib_own)
    table = partials(plan, queries, a, gamma=gamma, query_ids=ids, own_ids=own)   # arrow partials
    kl = strata_kl(con, table, plan.n, b)                               # sql/internal/kl_strata.sql
    table = widen(plan, table, queries, a, gamma=gamma, flags=hard, target=0.995)
    scanned_fraction(table, plan.n)

The partials table is what DuckDB turns into scores (``sql/internal/kl_strata.sql``), like
``queries.estimate`` does for the MIMPS estimator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from clip_density_index.indexer import defaults
from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.indexer.progress import Progress, null_progress
from clip_density_index.queries.exact import check_scale, to_tensor
from clip_density_index.queries.kl_sql import run_kl_statement
from clip_density_index.queries.threads import deal_to_threads, one_torch_thread

#: Lists per sqrt(N): L = LISTS_PER_SQRT_N * sqrt(N). Lists of ~sqrt(N)/2 rows are large enough for
#: efficient GEMMs and small enough that a query's mass sits in few of them; the centroid scoring
#: costs L = 2 sqrt(N) dot products per query (0.45% of N at 200k, 0.2% at 1M).
LISTS_PER_SQRT_N = 2.0
#: Directions of the pooled within-list covariance kept per list for ``var_l(q)``.
VAR_RANK = 32
#: k-means: training rows (at least TRAIN_PER_LIST per list, at least TRAIN_MIN) and iterations.
TRAIN_PER_LIST = 24
TRAIN_MIN = 20_000
KMEANS_ITER = 8
#: Candidates per block when assigning / summarising (block x L scores).
ASSIGN_BLOCK = 16384
#: Queries per batch of ``partials``: batch x L float64 model arrays (~8M cells, 64 MB each).
BATCH_CELLS = 8 << 20
#: Modelled share of each query's mass scanned exactly (the reason for its value: ``indexer.defaults``).
DEFAULT_TARGET = defaults.STRATA_TARGET
#: The variance scale of the probing ORDER (the log-normal's own 1): fixed, so that calibrating the
#: model's gamma cannot buy accuracy by scanning more.
PROBE_GAMMA = 1.0
DEFAULT_MAX_FRACTION = defaults.MAX_FRACTION
#: Calibration queries by default (``calibration_size``).
CALIBRATION_QUERIES = 512


@dataclass
class Plan:
    """The candidates partitioned into lists, stored list-major, with the model's per-list statistics.

    Attributes:
        order: (N,) int64, the candidate row of each list-major position.
        offsets: (L + 1,) int64, list ``l`` is ``vectors[offsets[l]:offsets[l + 1]]``.
        vectors: (N, d) list-major copy of the candidates (float32, or float16 when they were).
        means: (L, d) float64 list means ``mu_l`` (original space, not unit length).
        var_basis: (r, d) float64 top directions of the pooled within-list covariance.
        var_along: (L, r) float64 each list's variance along those directions.
        var_rest: (L,) float64 each list's remaining variance per dimension (isotropic).
        cand_sum: (d,) float64 ``sum_j v_j`` (the exact mean score).
        list_of: (N,) int32, the list of each candidate row (to force a query's own pair's list).
        seed: the k-means seed.
    """

    order: np.ndarray
    offsets: np.ndarray
    vectors: np.ndarray
    means: np.ndarray
    var_basis: np.ndarray
    var_along: np.ndarray
    var_rest: np.ndarray
    cand_sum: np.ndarray
    list_of: np.ndarray
    seed: int

    @property
    def n(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_lists(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


def default_lists(n: int) -> int:
    """L for N candidates: ``LISTS_PER_SQRT_N * sqrt(N)``, at least 1 and at most N / 8."""
    return int(max(1, min(round(LISTS_PER_SQRT_N * math.sqrt(n)), n // 8)))


def build_plan(
    candidates: np.ndarray,
    *,
    seed: int = 0,
    n_lists: int | None = None,
    queries: np.ndarray | None = None,
    progress: Progress | None = None,
) -> Plan:
    """Partition the candidates into lists and gather what the model needs.

    Args:
        candidates: (N, d) unit rows; may be a float16 memmap (read block by block; the list-major
            copy keeps float16).
        seed: k-means seed (training sample and initialisation).
        n_lists: L (default :func:`default_lists`).
        queries: optional sample of the queries (the other modality). When given, the lists are
            clustered in the metric ``x Sigma^(1/2)``, ``Sigma = E[q q']``: k-means then minimises
            the score variance within lists for typical queries, which is what the log-normal model
            and the probing order need (with lists clustered in image space, the model's tail
            measured worse than a uniform tail).
        progress: hook advanced by candidates assigned.

    Returns:
        A :class:`Plan`.
    """
    n, d = candidates.shape
    if n < 1:
        raise InvalidParameter("need at least one candidate")
    L = int(n_lists or default_lists(n))
    if not 1 <= L <= n:
        raise InvalidParameter(f"n_lists must be between 1 and N={n}, got {L}")
    rng = np.random.default_rng([seed, 7])
    half = _query_metric(queries, rng, d)
    train = np.sort(rng.choice(n, min(n, max(TRAIN_MIN, TRAIN_PER_LIST * L)), replace=False))
    centroids = _centroids(np.asarray(candidates[train], dtype=np.float32) @ half, L, seed)
    assign, counts = _drop_empty_lists(_assign(candidates, half, centroids, progress), L)
    order = np.argsort(assign, kind="stable").astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    vectors = _list_major(candidates, order)
    sums = np.add.reduceat(vectors, offsets[:-1], axis=0, dtype=np.float64)
    means = sums / counts[:, None]
    basis, along, rest = _list_variances(candidates, train, assign, vectors, offsets, means)
    return Plan(order=order, offsets=offsets, vectors=vectors, means=means, var_basis=basis,
                var_along=along, var_rest=rest, cand_sum=sums.sum(0),
                list_of=assign.astype(np.int32), seed=int(seed))


def _query_metric(queries: np.ndarray | None, rng: np.random.Generator, d: int) -> np.ndarray:
    """``Sigma^(1/2)``, ``Sigma = E[q q']`` over a sample of at most 20,000 queries (float32, d x d);
    the identity when no queries are given."""
    if queries is None or not len(queries):
        return np.eye(d, dtype=np.float32)
    q = np.asarray(queries[np.sort(rng.choice(len(queries), min(len(queries), 20_000), replace=False))],
                   dtype=np.float32)
    w, U = _eigh((q.T @ q).astype(np.float64) / len(q))
    return ((U * np.sqrt(np.clip(w, 0, None))) @ U.T).astype(np.float32)


def _centroids(xw: np.ndarray, L: int, seed: int) -> np.ndarray:
    """(L, d) float32 k-means centroids of the training rows ``xw`` (already in the query metric);
    their mean when ``L`` is 1."""
    import faiss

    if L == 1:
        return xw.mean(0, keepdims=True)
    km = faiss.Kmeans(xw.shape[1], L, niter=KMEANS_ITER, seed=int(seed) % (2**31), max_points_per_centroid=10**9,
                      min_points_per_centroid=1)
    km.train(np.ascontiguousarray(xw))
    return km.centroids.astype(np.float32)


def _assign(candidates: np.ndarray, half: np.ndarray, centroids: np.ndarray,
            progress: Progress | None) -> np.ndarray:
    """(N,) int64, the nearest centroid of every candidate in the query metric ``x half``:
    ``argmax x (half c)' - |c|^2 / 2``, one GEMM per block of ``ASSIGN_BLOCK`` candidates."""
    n = len(candidates)
    proj = np.ascontiguousarray((half @ centroids.T).astype(np.float32))  # (d, L)
    half_norm = 0.5 * (centroids.astype(np.float64) ** 2).sum(1).astype(np.float32)
    assign = np.empty(n, dtype=np.int64)
    with (progress or null_progress)("strata lists", n) as advance:
        for s in range(0, n, ASSIGN_BLOCK):
            x = np.asarray(candidates[s : s + ASSIGN_BLOCK], dtype=np.float32)
            assign[s : s + len(x)] = np.argmax(x @ proj - half_norm, axis=1)
            advance(len(x))
    return assign


def _drop_empty_lists(assign: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    """The assignment renumbered without the lists no candidate went to, and the lists' sizes."""
    counts = np.bincount(assign, minlength=L)
    keep = np.flatnonzero(counts)
    remap = np.full(L, -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    return remap[assign], counts[keep]


def _list_major(candidates: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``candidates[order]``, copied block by block in row order (memmap friendly); float16 stays
    float16, anything else becomes float32."""
    n, d = candidates.shape
    store = np.float16 if np.dtype(candidates.dtype) == np.float16 else np.float32
    vectors = np.empty((n, d), dtype=store)
    for s in range(0, n, ASSIGN_BLOCK):
        rows = order[s : s + ASSIGN_BLOCK]
        inv = np.argsort(rows, kind="stable")  # read in row order, place list-major
        vectors[s + inv] = candidates[rows[inv]]
    return vectors


def _list_variances(candidates: np.ndarray, train: np.ndarray, assign: np.ndarray, vectors: np.ndarray,
                    offsets: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's ``var_l(q)``: ``(basis (r, d), along (L, r), rest (L,))``.

    ``basis`` holds the top ``VAR_RANK`` directions of the pooled within-list covariance, estimated
    on the training rows (d x d from 30k rows is plenty); ``along`` each list's variance along them
    and ``rest`` its remaining variance per dimension (isotropic).
    """
    d = vectors.shape[1]
    L = len(offsets) - 1
    r = (np.asarray(candidates[train], dtype=np.float32) - means[assign[train]].astype(np.float32))
    w, U = _eigh((r.T @ r).astype(np.float64) / len(r))
    r_dim = min(VAR_RANK, d)
    basis = U[:, ::-1][:, :r_dim].T.copy()  # (r, d)
    along = np.empty((L, r_dim))
    total = np.empty(L)
    basis32 = basis.astype(np.float32)
    for lst in range(L):
        r = vectors[offsets[lst] : offsets[lst + 1]].astype(np.float32) - means[lst].astype(np.float32)
        along[lst] = ((r @ basis32.T).astype(np.float64) ** 2).mean(0)
        total[lst] = (r.astype(np.float64) ** 2).sum(1).mean()
    rest = np.clip(total - along.sum(1), 0, None) / max(d - r_dim, 1)
    return basis, along, rest


def _eigh(sym: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a small symmetric matrix (torch, one thread: numpy's threaded LAPACK
    took 5 s for 512 x 512 on the shared machine)."""
    with one_torch_thread():
        w, U = torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(sym, dtype=np.float64)))
    return w.numpy(), U.numpy()


# -- the model and the probing rule ----------------------------------------------------------------


def _model(plan: Plan, q64: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, v): ``a <q, mu_l>`` and ``a^2 var_l(q)``, (batch, L) float64."""
    means = torch.from_numpy(plan.means)
    m = a * (q64 @ means.T)
    p = (q64 @ torch.from_numpy(plan.var_basis).T) ** 2  # (b, r)
    rest = (q64**2).sum(1, keepdim=True) - p.sum(1, keepdim=True)
    v = p @ torch.from_numpy(plan.var_along).T + rest * torch.from_numpy(plan.var_rest)[None]
    return m, (a * a) * v.clamp_min(0)


def _probe_mask(log_mass: torch.Tensor, sizes: torch.Tensor, n: int, target: float,
                max_fraction: float, force: torch.Tensor | None = None) -> torch.Tensor:
    """Which lists each query scans: by modelled mass, until the modelled share reaches ``target``
    (the list that crosses it included) and without passing ``max_fraction * N`` candidates (the
    first list always), plus the list ``force[i]`` of each query (-1: none)."""
    b, L = log_mass.shape
    if target >= 1 and max_fraction >= 1:
        return torch.ones(b, L, dtype=torch.bool)
    sorted_mass, idx = torch.sort(log_mass, dim=1, descending=True)
    p = torch.softmax(sorted_mass, dim=1)
    before = torch.cumsum(p, dim=1) - p
    cum_size = torch.cumsum(sizes[idx], dim=1)
    take = (before < target) & (cum_size <= max_fraction * n)
    take[:, 0] = True
    mask = torch.zeros(b, L, dtype=torch.bool).scatter_(1, idx, take)
    if force is not None:
        rows = torch.nonzero(force >= 0)[:, 0]
        mask[rows, force[rows]] = True
    return mask


def _log_mass(plan: Plan, m: torch.Tensor, v: torch.Tensor, gamma: float) -> torch.Tensor:
    """``log |l| + m + gamma v / 2``, (b, L)."""
    return torch.log(torch.from_numpy(plan.sizes).to(torch.float64))[None] + m + (0.5 * gamma) * v


def _own_lists(plan: Plan, own_ids: np.ndarray | None, q: int) -> torch.Tensor | None:
    if own_ids is None:
        return None
    own = np.asarray(own_ids, dtype=np.int64)
    if own.shape != (q,):
        raise InvalidParameter(f"own_ids must have one id per query ({q}), got shape {own.shape}")
    if len(own) and (own.max() >= plan.n):
        raise InvalidParameter(f"own_ids must be candidate rows below N={plan.n} (or negative for none)")
    return torch.from_numpy(np.where(own >= 0, plan.list_of[np.clip(own, 0, None)], -1).astype(np.int64))


# -- exact list-major scanning ---------------------------------------------------------------------


def _scan(plan: Plan, qa: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype):
    """Exact partial sums of every (query, probed list) slot, one GEMM per list.

    Args:
        qa: (b, d) ``a * q`` in ``dtype``.
        mask: (b, L) bool, the lists each query scans.

    Returns:
        ``(query, lst, m, s0, s1)`` per slot, slots grouped by list: ``m`` the slot's max score,
        ``s0 = sum e^{s - m}``, ``s1 = sum e^{s - m} (s - m)`` (centred: float32 keeps its relative
        precision), all float64 tensors.
    """
    pairs = torch.nonzero(mask.T)  # (slots, 2): (list, query), grouped by list
    lst, query = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()
    counts = torch.bincount(lst, minlength=plan.n_lists).numpy()
    starts = np.concatenate([[0], np.cumsum(counts)])
    k = len(query)
    out_m = torch.empty(k, dtype=dtype)
    out_s0 = torch.empty(k, dtype=dtype)
    out_s1 = torch.empty(k, dtype=dtype)
    offsets = plan.offsets
    vectors = plan.vectors

    def run(lists: np.ndarray) -> None:
        for li in lists.tolist():
            a0, a1 = int(starts[li]), int(starts[li + 1])
            block = torch.from_numpy(vectors[offsets[li] : offsets[li + 1]]).to(dtype)
            s = qa[query[a0:a1]] @ block.T  # (queries of the list, list size): exact scores
            mx = s.max(dim=1).values
            x = s.sub_(mx[:, None])
            e = torch.exp(x)
            out_m[a0:a1] = mx
            out_s0[a0:a1] = e.sum(dim=1)
            out_s1[a0:a1] = e.mul_(x).sum(dim=1)

    lists = np.flatnonzero(counts)
    deal_to_threads(run, lists, counts[lists] * np.diff(offsets)[lists])
    f64 = torch.float64
    return query, lst, out_m.to(f64), out_s0.to(f64), out_s1.to(f64)


def _batch(plan: Plan, queries: np.ndarray, a: float, gamma: float, target: float, max_fraction: float,
           dtype: torch.dtype, force: torch.Tensor | None) -> dict[str, np.ndarray]:
    """Partial sums of one batch of queries (float64 numpy columns, no query ids)."""
    b = len(queries)
    q64 = to_tensor(queries, torch.device("cpu"), torch.float64)
    sizes = torch.from_numpy(plan.sizes)
    with one_torch_thread():
        m, v = _model(plan, q64, a)
        mask = _probe_mask(_log_mass(plan, m, v, PROBE_GAMMA), sizes, plan.n, target, max_fraction, force)
        log_mass = _log_mass(plan, m, v, gamma)
    query, _, sm, s0, s1 = _scan(plan, (q64 * a).to(dtype), mask, dtype)
    with one_torch_thread():
        shift = torch.full((b,), -math.inf, dtype=torch.float64).scatter_reduce_(0, query, sm, "amax")
        w = torch.exp(sm - shift[query])
        scanned_sum = torch.zeros(b, dtype=torch.float64).index_add_(0, query, s0 * w)
        scanned_sum_s = torch.zeros(b, dtype=torch.float64).index_add_(0, query, (s1 + sm * s0) * w)
        z = torch.where(mask, 0.0, torch.exp(log_mass - shift[:, None]))
        mean_s = a * (q64 @ torch.from_numpy(plan.cand_sum)) / plan.n
    return {
        "shift": shift.numpy(),
        "scanned_sum": scanned_sum.numpy(),
        "scanned_sum_s": scanned_sum_s.numpy(),
        "scanned_n": (mask.to(torch.int64) @ sizes).numpy(),
        "model_sum": z.sum(1).numpy(),
        "model_sum_s": (z * (m + gamma * v)).sum(1).numpy(),
        "mean_s": mean_s.numpy(),
    }


def _batch_size(plan: Plan) -> int:
    return max(256, BATCH_CELLS // max(plan.n_lists, 1))


def partials(
    plan: Plan,
    queries: np.ndarray,
    a: float,
    *,
    gamma: float,
    target: float = DEFAULT_TARGET,
    max_fraction: float = DEFAULT_MAX_FRACTION,
    query_ids: np.ndarray | None = None,
    own_ids: np.ndarray | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> pa.Table:
    """Per-query partial sums of the stratified estimate (the input of ``sql/internal/kl_strata.sql``).

    Args:
        plan: :func:`build_plan` of the candidates.
        queries: (q, d) unit queries (the other modality).
        a: logit scale.
        gamma: the calibrated variance scale (:func:`calibrate`).
        target: modelled share of each query's mass to scan exactly (>= 1 with ``max_fraction``
            >= 1: every list, the exact result).
        max_fraction: most candidates one query scans, as a fraction of N (one list at least).
        query_ids: the queries' ids in the table (default ``0..q-1``).
        own_ids: (q,) candidate row of each query's own pair (pool scoring), or None; its list is
            always scanned: the own pair usually holds much of Z, and a list's log-normal cannot
            see one outlier (near-duplicates of it share its list too). Negative: none.
        dtype: GEMM / exp dtype: float32 (default; scores as exact as ``exact_kl(dtype=float32)``)
            or float64 (reference). Every merge is float64.
        progress: hook advanced by queries done.

    Returns:
        Arrow table ``(query BIGINT, shift, scanned_sum, scanned_sum_s DOUBLE, scanned_n BIGINT,
        model_sum, model_sum_s, mean_s DOUBLE)``: ``scanned_sum = sum e^{s - shift}`` and
        ``scanned_sum_s = sum e^{s - shift} s`` over the scanned lists (``shift`` = their largest
        score), ``scanned_n`` their size, ``model_sum`` / ``model_sum_s`` the same moments modelled
        for the other lists (relative to the same shift; may exceed 1), ``mean_s`` exact.
    """
    _check_partials(plan, a, target, max_fraction, dtype)
    q = len(queries)
    qids = np.arange(q, dtype=np.int64) if query_ids is None else np.asarray(query_ids, dtype=np.int64)
    if len(qids) != q:
        raise InvalidParameter(f"{len(qids)} query ids for {q} queries")
    force = _own_lists(plan, own_ids, q)
    step = _batch_size(plan)
    parts = []
    with (progress or null_progress)("strata scan", q) as advance:
        for s in range(0, q, step):
            part = _batch(plan, np.asarray(queries[s : s + step]), a, gamma, target, max_fraction, dtype,
                          None if force is None else force[s : s + step])
            parts.append(part)
            advance(len(part["shift"]))
    return _partials_table(qids, parts)


#: The columns of a partials table after ``query`` (what ``_batch`` returns for each batch).
PARTIALS_COLUMNS = ("shift", "scanned_sum", "scanned_sum_s", "scanned_n", "model_sum", "model_sum_s", "mean_s")


def _check_partials(plan: Plan, a: float, target: float, max_fraction: float, dtype: torch.dtype) -> None:
    """Raise ``InvalidParameter`` for a bad scale, GEMM dtype or scan budget of :func:`partials`."""
    check_scale(a, None, plan.n)
    if dtype not in (torch.float32, torch.float64):
        raise InvalidParameter(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    if not target > 0 or not max_fraction > 0:
        raise InvalidParameter(f"target and max_fraction must be positive, got {target!r}, {max_fraction!r}")


def _partials_table(qids: np.ndarray, parts: list[dict[str, np.ndarray]]) -> pa.Table:
    """The batches' columns concatenated under their query ids (typed empty columns for no query)."""
    out = {"query": qids}
    for k in PARTIALS_COLUMNS:
        out[k] = (np.concatenate([part[k] for part in parts]) if parts
                  else np.zeros(0, np.int64 if k == "scanned_n" else np.float64))
    return pa.table(out)


def widen(
    plan: Plan,
    table: pa.Table,
    queries: np.ndarray,
    a: float,
    *,
    gamma: float,
    flags: np.ndarray,
    target: float,
    max_fraction: float = 1.0,
    own_ids: np.ndarray | None = None,
    dtype: torch.dtype = torch.float32,
) -> pa.Table:
    """Rescan the flagged queries with a larger ``target`` / ``max_fraction``; the other rows are kept.

    Args:
        table: a :func:`partials` table of these ``queries`` (same row order).
        flags: (q,) bool, the rows to rescan (e.g. the largest ``model_sum`` share, or every row
            when the held-out check missed its target).
        target, max_fraction: the wider budget.

    Returns:
        The table with the flagged rows replaced.
    """
    flags = np.asarray(flags, dtype=bool)
    if len(flags) != table.num_rows or len(queries) != table.num_rows:
        raise InvalidParameter(f"flags ({len(flags)}) and queries ({len(queries)}) must match the table "
                               f"({table.num_rows} rows)")
    rows = np.flatnonzero(flags)
    if not len(rows):
        return table
    qids = table.column("query").to_numpy()
    redo = partials(plan, np.asarray(queries)[rows], a, gamma=gamma, target=target,
                    max_fraction=max_fraction, query_ids=qids[rows], dtype=dtype,
                    own_ids=None if own_ids is None else np.asarray(own_ids)[rows])
    cols = {}
    for name in table.column_names:
        col = table.column(name).to_numpy().copy()
        col[rows] = redo.column(name).to_numpy()
        cols[name] = col
    return pa.table(cols, schema=table.schema)


def scanned_fraction(table: pa.Table, n: int) -> float:
    """Share of the query x candidate pairs computed exactly (the lists' centroid scores and the
    ``VAR_RANK`` variance dot products, ~2 sqrt(N) + 32 per query, are not included)."""
    rows = table.num_rows
    return float(np.sum(table.column("scanned_n").to_numpy())) / (rows * n) if rows else 0.0


# -- calibration -----------------------------------------------------------------------------------


@dataclass
class ListSums:
    """Exact per-list moments of a set of queries: ``log_z[i, l] = log sum_{j in l} e^{s_ij}`` and
    ``mean[i, l] = sum e^s s / sum e^s`` over list l, plus the model's ``m`` and ``v`` for them."""

    log_z: np.ndarray
    mean: np.ndarray
    m: np.ndarray
    v: np.ndarray
    mean_s: np.ndarray
    force: np.ndarray | None = None


def list_sums(plan: Plan, queries: np.ndarray, a: float, own_ids: np.ndarray | None = None,
              dtype: torch.dtype = torch.float32) -> ListSums:
    """Exact per-list moments of ``queries`` (every list scanned: N dot products per query);
    ``own_ids`` as in :func:`partials` (kept for the replay of the probing rule)."""
    force = _own_lists(plan, own_ids, len(queries))
    q64 = to_tensor(np.asarray(queries), torch.device("cpu"), torch.float64)
    b, L = len(q64), plan.n_lists
    query, lst, sm, s0, s1 = _scan(plan, (q64 * a).to(dtype), torch.ones(b, L, dtype=torch.bool), dtype)
    log_z = torch.empty(b, L, dtype=torch.float64)
    mean = torch.empty(b, L, dtype=torch.float64)
    log_z[query, lst] = sm + torch.log(s0)
    mean[query, lst] = sm + s1 / s0
    m, v = _model(plan, q64, a)
    mean_s = a * (q64 @ torch.from_numpy(plan.cand_sum)) / plan.n
    return ListSums(log_z.numpy(), mean.numpy(), m.numpy(), v.numpy(), mean_s.numpy(),
                    None if force is None else force.numpy())


def _estimate_from_sums(plan: Plan, sums: ListSums, gamma: float, target: float,
                        max_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(log Z, E[s]) estimated for the calibration queries from their exact per-list sums, with
    the probing rule and model of :func:`partials`."""
    m, v = torch.from_numpy(sums.m), torch.from_numpy(sums.v)
    sizes = torch.from_numpy(plan.sizes)
    force = None if sums.force is None else torch.from_numpy(sums.force)
    mask = _probe_mask(_log_mass(plan, m, v, PROBE_GAMMA), sizes, plan.n, target, max_fraction, force)
    log_mass = _log_mass(plan, m, v, gamma)
    log_part = torch.where(mask, torch.from_numpy(sums.log_z), log_mass)
    mean_part = torch.where(mask, torch.from_numpy(sums.mean), m + gamma * v)
    log_z = torch.logsumexp(log_part, dim=1)
    e_s = (torch.softmax(log_part, dim=1) * mean_part).sum(1)
    return log_z.numpy(), e_s.numpy()


def _exact_moments(sums: ListSums) -> tuple[np.ndarray, np.ndarray]:
    """(log Z, E[s]) of the calibration queries over all lists."""
    log_z = np.logaddexp.reduce(sums.log_z, axis=1)
    return log_z, (np.exp(sums.log_z - log_z[:, None]) * sums.mean).sum(1)


def calibration_error(plan: Plan, sums: ListSums, gamma: float, target: float = DEFAULT_TARGET,
                      max_fraction: float = DEFAULT_MAX_FRACTION, exact=None) -> float:
    """Root mean square error, over the calibration queries, of KL and KLR together (nats)."""
    exact_lz, exact_es = _exact_moments(sums) if exact is None else exact
    lz, es = _estimate_from_sums(plan, sums, gamma, target, max_fraction)
    err_klr = lz - exact_lz
    err_kl = (es - exact_es) - err_klr
    return float(np.sqrt(np.mean(err_kl**2 + err_klr**2) / 2))


def calibrate(
    plan: Plan,
    calib_queries: np.ndarray,
    a: float,
    *,
    target: float = DEFAULT_TARGET,
    max_fraction: float = DEFAULT_MAX_FRACTION,
    own_ids: np.ndarray | None = None,
    sums: ListSums | None = None,
) -> float:
    """Fit gamma, the model's variance scale, on exact rows of calibration queries (SPEC 3.2).

    The calibration queries' exact per-list sums (:func:`list_sums`, N dot products each) are
    replayed under the same probing rule as :func:`partials` with ``target`` / ``max_fraction``; the
    gamma with the smallest RMS error of KL and KLR is returned (a grid over [0, 4] in steps of 0.25,
    then a golden-section search around the best). One scale for all lists: per-list fitted
    log-normals collapse on heavy-tailed pools (the heavy-tailed synthetic worlds), and the scale
    absorbs the model's bias where lists are not log-normal. Use a random set of queries, disjoint
    from the held-out check.

    Args:
        calib_queries: (c, d) unit queries, a random sample (default size ``CALIBRATION_QUERIES``).
        own_ids: the calibration queries' own pairs, when the run passes ``own_ids`` to partials.
        sums: their ``list_sums`` when already computed (e.g. to refit for another target).

    Returns:
        gamma (>= 0).
    """
    check_scale(a, None, plan.n)
    if sums is None:
        if not len(calib_queries):
            raise InvalidParameter("calibration needs at least one query")
        sums = list_sums(plan, calib_queries, a, own_ids=own_ids)

    exact = _exact_moments(sums)

    def err(g: float) -> float:
        with one_torch_thread():
            return calibration_error(plan, sums, g, target, max_fraction, exact)

    return _minimise(err, np.linspace(0.0, 4.0, 17))


def _minimise(err, grid: np.ndarray, steps: int = 12) -> float:
    """The argument of the smallest ``err`` found: over ``grid``, then by a golden-section search of
    ``steps`` steps between the best grid point's neighbours."""
    errs = [err(g) for g in grid]
    i = int(np.argmin(errs))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    f1, f2 = err(x1), err(x2)
    for _ in range(steps):
        if f1 <= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - ratio * (hi - lo)
            f1 = err(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + ratio * (hi - lo)
            f2 = err(x2)
    best = min([(errs[i], float(grid[i])), (f1, x1), (f2, x2)])
    return float(best[1])


# -- the scores in SQL -----------------------------------------------------------------------------


def strata_kl(con, partials_table: pa.Table, n: int, b: float | None = None) -> pa.Table:
    """Run ``sql/internal/kl_strata.sql`` over a :func:`partials` table (``queries.kl_sql``).

    Args:
        con: a DuckDB connection (the table is registered as ``partials`` for the call, and the
            macro of ``sql/internal/kl_formula.sql`` created).
        partials_table: :func:`partials` output.
        n: N, the number of candidates.
        b: SigLIP logit bias, or None (CLIP).

    Returns:
        Arrow table ``(query BIGINT, kl DOUBLE, klr DOUBLE, model_share DOUBLE)`` ordered by query;
        ``model_share`` is the modelled part of each query's estimated Z (what :func:`widen` may
        rescan).
    """
    return run_kl_statement(con, "kl_strata", {"partials": partials_table}, n, b)

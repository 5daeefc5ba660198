"""Top-k head + sampled tail estimate of D_KL and D_KLR (SPEC 3, the MIMPS estimator).

For a query ``q`` over N candidates with ``s_j = a <v_q, v_j>``:

* ``K``: the ``k`` nearest candidates by inner product, from the other modality's FAISS index
  (rescored exactly from the stored embeddings when the index's scores are lossy, SQ / PQ). An IVF
  probe may find fewer than ``k``: ``k_q`` is the number actually found.
* ``R``: a uniform random sample of ``m`` candidate ids, drawn once per run (seeded, ``draw_tail``);
  each query uses ``R \\ K``.
* ``Z_hat = sum_K e^s + (N - k_q) / |R \\ K| * sum_{R \\ K} e^s`` and ``E_hat[s]`` alike with ``e^s s``.
* ``mean s`` over all N is exact: ``a <v_q, sum_j v_j> / N``.
* ``D_KL ~ E_hat[s] - log Z_hat + log N``, ``D_KLR ~ log Z_hat - log N - mean s`` (SigLIP: SPEC 2).

The work is split so that every heavy step is one vectorised array operation and the estimator
itself is a readable SQL statement (``sql/internal/kl_per_sample.sql``):

1. ``search_neighbours`` / ``neighbour_table`` (``neighbour_lists`` does both): FAISS search ->
   arrow table ``(query, candidate, rank, score)``.
2. ``tail_sums``: one GEMM of the queries against ``R`` -> arrow table ``(query, shift, tail_sum,
   tail_sum_s, tail_m, mean_s)`` with sums over each query's ``R \\ K`` (its neighbours are left
   out of the sums, not subtracted afterwards), relative to a per-query max-shift.
3. ``kl_from_lists``: DuckDB joins the neighbour list with the tail sums and computes both scores
   per query in float64.

Cost per query, in dot products (``dots_per_query``): the FAISS search (``choose.dots_per_query``),
``m`` for the tail, ``k`` more when the neighbours are rescored, and 1 for the exact mean.
With ``m = 0`` the estimate is top-k only: biased (the tail mass is dropped), allowed, documented.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from clip_density_index.indexer.device import resolve_device
from clip_density_index.queries.exact import candidate_sum, check_scale, sample_ids, to_tensor
from clip_density_index.queries.kl_sql import run_kl_statement
from clip_density_index.queries.threads import deal_to_threads

log = logging.getLogger(__name__)

#: Queries per block of the tail GEMM (block x m float32 scores).
TAIL_CHUNK = 8192
#: Gathered candidate values per rescoring block (16 MB of float32: small blocks stay in cache).
RESCORE_BLOCK_VALUES = 4 << 20
#: Query batches at least this large search an IVF-Flat index with ``IvfFlatLists`` (GEMM per list).
BATCH_SEARCH_MIN = 1024
#: Candidate slots (queries x nprobe x k) buffered per block of the batched IVF search (~400 MB).
BATCH_SEARCH_SLOTS = 32 << 20


def draw_tail(n: int, m: int, seed: int) -> np.ndarray:
    """The tail sample R: ``m`` distinct candidate ids drawn uniformly from ``range(n)``.

    Drawn once per run and shared by every query. Sorted int64.

    Raises:
        InvalidParameter: ``m`` is negative or larger than ``n``.
    """
    return sample_ids(n, m, seed)


# -- 1. neighbour lists --------------------------------------------------------------------------


@dataclass
class Neighbours:
    """The top-k of a block of queries: ``ids`` (q, k) int64 (-1 = not found, always at the end of
    a row), ``scores`` (q, k) float64 ``a <q, c>`` (-inf where not found), best first."""

    ids: np.ndarray
    scores: np.ndarray
    rescored: bool

    @property
    def top(self) -> np.ndarray:
        """The best score of each query (-inf when none was found)."""
        return self.scores.max(axis=1, initial=-np.inf)


def needs_rescore(index) -> bool:
    """True when the index's search scores are not exact inner products (SQ / PQ codes, or a
    metric other than inner product)."""
    import faiss

    from clip_density_index.indexer.faiss_index import returns_exact_scores

    return index.metric_type != faiss.METRIC_INNER_PRODUCT or not returns_exact_scores(index)


def rescore(queries: np.ndarray, candidates: np.ndarray, ids: np.ndarray, a: float,
            dtype: type = np.float32) -> np.ndarray:
    """``a <q_i, c_{ids[i, r]}>`` from the stored embeddings for every neighbour slot (-inf where
    ids < 0), as float64.

    By default the dot products are taken in float32, like the scores of an exact (Flat) FAISS
    index: the error is ~1e-6 per dot product, against ~1e-2 for SQ8 / PQ codes (``dtype=np.float64``
    for reference computations). Works in small blocks of queries (k gathered rows each) to stay in
    cache: ~4,000 queries/s for k=256, d=512 on one core.
    """
    q, k = ids.shape
    out = np.full((q, k), -np.inf)
    if q == 0 or k == 0:
        return out
    d = candidates.shape[1]
    block = max(1, RESCORE_BLOCK_VALUES // (k * d))
    for s in range(0, q, block):
        blk = ids[s : s + block]
        valid = blk >= 0
        rows = np.asarray(candidates[np.where(valid, blk, 0)], dtype=dtype)  # (b, k, d)
        qb = np.asarray(queries[s : s + block], dtype=dtype)
        dots = np.einsum("bkd,bd->bk", rows, qb)
        out[s : s + block] = np.where(valid, a * dots.astype(np.float64), -np.inf)
    return out


class IvfFlatLists:
    """A CPU IVF-Flat inner-product index searched list by list with matrix products.

    ``search`` returns what FAISS's own ``IndexIVFFlat.search`` returns (the top-k by inner product
    among the vectors of each query's ``nprobe`` nearest lists, exact float32 scores, -1 / -inf
    where fewer than k were found), computed differently: FAISS scans each query's lists one vector
    at a time, while scoring a whole pool sends thousands of queries to every list, so here the
    queries are grouped by list and each list is scored with one GEMM (queries of the list x the
    list's vectors). The coarse assignment is FAISS's own quantizer. The lists are dealt to as
    many Python threads as torch has intra-op threads, each running its GEMMs on one core. Measured
    on the 2-core reference machine (a FAISS build without AVX2), 1M vectors, IVF4096, 32,768
    queries: 4,900 vs 4,000 queries/s (FAISS) at nprobe 4, k 256; 8,800 vs 4,700 at k 16; 2,700 vs
    1,100 at nprobe 16, all with one thread for the lists (the coarse quantizer, shared by both, is
    the floor). With two threads for the lists (the machine's two cores), the same 32,768 queries:
    2.3-2.7 s against 4.1-4.3 s with one at nprobe 4, 4.3-5.5 s against 5.8-5.9 s at nprobe 8, k 256.

    The lists are zero-copy views of the index's memory: keep the index alive while this is used.
    """

    def __init__(self, ivf):
        import faiss

        self.ivf = ivf
        self.nlist, d = int(ivf.nlist), int(ivf.d)
        inv = ivf.invlists
        self.sizes = np.array([inv.list_size(i) for i in range(self.nlist)], dtype=np.int64)
        vectors, ids = [], []
        with warnings.catch_warnings():  # read-only views; only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for i, size in enumerate(self.sizes.tolist()):
                if size == 0:
                    vectors.append(None)
                    ids.append(None)
                    continue
                codes = faiss.rev_swig_ptr(inv.get_codes(i), size * d * 4).view(np.float32).reshape(size, d)
                vectors.append(torch.from_numpy(codes))
                ids.append(torch.from_numpy(faiss.rev_swig_ptr(inv.get_ids(i), size).view(np.int64)))
        self.vectors, self.ids = vectors, ids

    @classmethod
    def of(cls, index) -> "IvfFlatLists | None":
        """The lists of ``index`` when it is a CPU IVF-Flat inner-product index held in arrays, else
        None (Flat, HNSW, SQ / PQ codes, GPU indexes and other list storages go through FAISS)."""
        import faiss

        from clip_density_index.indexer.faiss_index import is_gpu_index

        if is_gpu_index(index):
            return None
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is None or ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
            return None
        ivf = faiss.downcast_index(ivf)
        if type(ivf) is not faiss.IndexIVFFlat:
            return None
        if not isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists):
            return None
        return cls(ivf)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of each query: ``(scores float32 (q, k), ids int64 (q, k))``, best first."""
        nprobe = min(int(nprobe or self.ivf.nprobe), self.nlist)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        block = max(1, BATCH_SEARCH_SLOTS // (nprobe * k))
        out_s = np.empty((len(q), k), dtype=np.float32)
        out_i = np.empty((len(q), k), dtype=np.int64)
        for s in range(0, len(q), block):
            out_s[s : s + block], out_i[s : s + block] = self._search_block(q[s : s + block], k, nprobe)
        return out_s, out_i

    def _search_block(self, q: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        _, probes = self.ivf.quantizer.search(q, nprobe)  # (b, nprobe) nearest lists
        flat = probes.ravel()
        order = np.argsort(flat, kind="stable")  # (query, probe) slots grouped by list
        counts = np.bincount(flat, minlength=self.nlist)
        starts = np.cumsum(counts) - counts
        order_t = torch.from_numpy(order)
        qt = to_tensor(q, torch.device("cpu"), torch.float32)
        # each (query, probe) slot keeps the top-k of its list; -inf / -1 = nothing
        best_s = torch.full((len(q), nprobe, k), -math.inf)
        best_i = torch.full((len(q), nprobe, k), -1, dtype=torch.int64)

        def scan(lists: np.ndarray) -> None:
            for lst in lists.tolist():
                slots = order_t[starts[lst] : starts[lst] + counts[lst]]
                qi, pj = slots // nprobe, slots % nprobe
                scores = qt[qi] @ self.vectors[lst].T  # (queries of the list, list size)
                if scores.shape[1] > k:
                    scores, pos = torch.topk(scores, k, dim=1, sorted=False)
                    ids = self.ids[lst][pos]
                else:
                    ids = self.ids[lst].expand(len(qi), -1)
                width = scores.shape[1]
                best_s[qi, pj, :width] = scores  # every (query, probe) slot belongs to one list:
                best_i[qi, pj, :width] = ids     # the workers never write the same cells

        lists = np.flatnonzero((counts > 0) & (self.sizes > 0))
        deal_to_threads(scan, lists, counts[lists] * self.sizes[lists])  # thousands of small GEMMs
        top_s, pos = torch.topk(best_s.view(len(q), -1), k, dim=1)  # merge the nprobe lists, sorted
        return top_s.numpy(), torch.gather(best_i.view(len(q), -1), 1, pos).numpy()


def search(index, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``indexer.faiss_index.search``, with large batches on a CPU IVF-Flat index scored list by
    list (``IvfFlatLists``; same results, faster for whole-pool scoring)."""
    from clip_density_index.indexer.faiss_index import check_search
    from clip_density_index.indexer.faiss_index import search as faiss_search

    lists = IvfFlatLists.of(index) if len(queries) >= BATCH_SEARCH_MIN else None
    if lists is None:
        return faiss_search(index, queries, k, nprobe=nprobe)
    return lists.search(check_search(index, queries, k, nprobe), k, nprobe)


def search_neighbours(
    index,
    queries: np.ndarray,
    candidates: np.ndarray,
    k: int,
    a: float,
    *,
    nprobe: int | None = None,
    rescore_scores: bool | None = None,
    own_ids: np.ndarray | None = None,
    dtype: type = np.float32,
) -> Neighbours:
    """FAISS top-k of each query, scored ``a <q, c>``, plus (optionally) each query's own pair.

    Args:
        index: FAISS index over ``candidates`` (ids = row numbers), inner-product metric.
        queries: (q, d) normalised queries.
        candidates: (N, d) stored candidate embeddings (used only when rescoring).
        k: neighbours per query.
        a: logit scale.
        nprobe: IVF lists to visit (None: the index's own setting).
        rescore_scores: recompute the scores exactly from ``candidates``; default: when the index's
            scores are lossy (``needs_rescore``). Rows are re-sorted by the exact scores.
        own_ids: (q,) the candidate id of each query's own pair (pool scoring: the query's vec_id).
            When given, a query whose search missed its own pair gets it added to K with its exact
            score (one more dot product), at its place by score: the result has ``k + 1`` slots.
            The own pair usually dominates ``Z`` (its score is the largest by a margin), so an
            approximate index that misses it would leave that mass to the sampled tail; with it in
            K the estimator stays unbiased (K is still a function of the query alone) and its
            variance drops.
        dtype: precision of the rescoring and own-pair dot products (``rescore``).

    Returns:
        ``Neighbours``.
    """
    if rescore_scores is None:
        rescore_scores = needs_rescore(index)
    raw, ids = search(index, queries, k, nprobe=nprobe)
    if rescore_scores:
        scores = rescore(queries, candidates, ids, a, dtype)
        order = np.argsort(-scores, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
    else:
        scores = a * raw.astype(np.float64)  # -inf stays -inf where nothing was found
    if own_ids is not None:
        ids, scores = _with_own_pair(queries, candidates, ids, scores, np.asarray(own_ids, np.int64), a, dtype)
    return Neighbours(ids=ids, scores=scores, rescored=bool(rescore_scores))


def _with_own_pair(queries, candidates, ids, scores, own, a, dtype):
    """Insert each query's own pair into its (descending) row unless already there; ``k + 1`` slots.

    A row that already holds its own pair gets an empty slot (-1, -inf) at the end instead.
    """
    q, k = ids.shape
    own_vec = np.asarray(candidates[own], dtype=dtype)
    own_score = a * np.einsum("qd,qd->q", np.asarray(queries, dtype=dtype), own_vec).astype(np.float64)
    missing = ~(ids == own[:, None]).any(axis=1)
    pos = np.where(missing, (scores > own_score[:, None]).sum(axis=1), k)  # slot of the own pair
    cols = np.arange(k + 1)[None, :]
    src = np.minimum(cols - (cols > pos[:, None]), k - 1)  # old slot feeding each new slot
    at = cols == pos[:, None]
    new_ids = np.where(at, np.where(missing, own, -1)[:, None], np.take_along_axis(ids, src, axis=1))
    new_scores = np.where(at, np.where(missing, own_score, -np.inf)[:, None],
                          np.take_along_axis(scores, src, axis=1))
    return new_ids, new_scores


def neighbour_table(query_ids: np.ndarray, nb: Neighbours) -> pa.Table:
    """Arrow table ``(query BIGINT, candidate BIGINT, rank INT, score DOUBLE)``, one row per found
    neighbour (slots with id -1 are dropped)."""
    q, k = nb.ids.shape
    query = np.repeat(np.asarray(query_ids, dtype=np.int64), k)
    rank = np.tile(np.arange(k, dtype=np.int32), q)
    cand, score = nb.ids.ravel(), nb.scores.ravel()
    valid = cand >= 0
    if not valid.all():
        query, rank, cand, score = query[valid], rank[valid], cand[valid], score[valid]
    return pa.table({"query": query, "candidate": cand, "rank": rank, "score": score})


def neighbour_lists(index, queries: np.ndarray, candidates: np.ndarray, k: int, a: float, *,
                    query_ids: np.ndarray | None = None, **search_options) -> pa.Table:
    """``search_neighbours`` + ``neighbour_table``: the arrow neighbour list of ``queries``.

    ``query_ids`` are the queries' vec_ids (default ``0..q-1``); ``search_options`` are the keywords
    of ``search_neighbours`` (``nprobe``, ``rescore_scores``, ``own_ids``, ``dtype``).
    """
    nb = search_neighbours(index, queries, candidates, k, a, **search_options)
    qids = np.arange(len(queries), dtype=np.int64) if query_ids is None else query_ids
    return neighbour_table(qids, nb)


# -- 2. tail sums --------------------------------------------------------------------------------


def tail_sums(
    queries: np.ndarray,
    candidates: np.ndarray,
    tail_ids: np.ndarray,
    a: float,
    shift_from_topk: np.ndarray,
    *,
    exclude: np.ndarray | None = None,
    query_ids: np.ndarray | None = None,
    cand_sum: np.ndarray | None = None,
    tail_vectors: np.ndarray | None = None,
    chunk: int = TAIL_CHUNK,
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
) -> pa.Table:
    """Per-query sums over the tail ``R \\ K``, relative to a max-shift.

    One GEMM of (chunk x d) queries against the (m x d) tail vectors per chunk; the exponentials
    are taken relative to ``shift = max(top-1 score, max_R s)``, so none overflows and the largest
    is 1. Each query's neighbours (``exclude``, its K) are left out of its sums here: subtracting
    them later from the sum over all of R, with scores rounded differently, cancelled badly (the
    neighbours dominate the sum, and the remainder is multiplied by (N - k) / |R \\ K|). The
    results are float64.

    Args:
        queries: (q, d) normalised queries.
        candidates: (N, d) stored candidate embeddings.
        tail_ids: R, the sorted candidate ids of the tail sample (``draw_tail``).
        a: logit scale.
        shift_from_topk: (q,) the best neighbour score of each query (-inf when none).
        exclude: (q, k) candidate ids of each query's K (-1 = empty slot), left out of its sums;
            None sums over all of R.
        query_ids: the queries' vec_ids (default ``0..q-1``).
        cand_sum: ``sum_j v_j`` over all candidates (default: computed from ``candidates``).
        tail_vectors: ``candidates[tail_ids]``, when the caller already gathered them.
        chunk: queries per GEMM block.
        device: torch device (``"auto"``: CUDA when available).
        dtype: GEMM / exp / row-sum dtype (float32 default, or float64).

    Returns:
        Arrow table ``(query BIGINT, shift, tail_sum, tail_sum_s DOUBLE, tail_m BIGINT,
        mean_s DOUBLE)`` with ``tail_sum = sum_{R\\K} e^{s - shift}``, ``tail_sum_s = sum_{R\\K}
        e^{s - shift} s``, ``tail_m = |R \\ K|`` and ``mean_s = a <q, sum_j v_j> / N`` (exact).
    """
    q, n = len(queries), len(candidates)
    m = len(tail_ids)
    qids = np.arange(q, dtype=np.int64) if query_ids is None else np.asarray(query_ids, dtype=np.int64)
    if cand_sum is None:
        cand_sum = candidate_sum(candidates)
    q64 = np.asarray(queries, dtype=np.float64)
    mean_s = a * (q64 @ np.asarray(cand_sum, dtype=np.float64)) / n
    shift = np.asarray(shift_from_topk, dtype=np.float64).copy()
    t_sum = np.zeros(q)
    t_sum_s = np.zeros(q)
    t_m = np.full(q, m, dtype=np.int64)
    tail_ids = np.asarray(tail_ids, dtype=np.int64)
    if m:
        where_in_r = None if exclude is None else _positions_in_tail(tail_ids, n)
        gemm = _TailGemm(candidates[tail_ids] if tail_vectors is None else tail_vectors, a, device, dtype)
        for s in range(0, q, chunk):
            sl = slice(s, s + chunk)
            t_sum[sl], t_sum_s[sl], shift[sl], dropped = gemm.block_sums(
                queries[sl], shift[sl], None if exclude is None else where_in_r[exclude[sl]])
            t_m[sl] -= dropped
    shift[~np.isfinite(shift)] = 0.0  # no neighbour and no tail: nothing to shift
    return pa.table({
        "query": qids,
        "shift": shift,
        "tail_sum": t_sum,
        "tail_sum_s": t_sum_s,
        "tail_m": t_m,
        "mean_s": mean_s,
    })


def _positions_in_tail(tail_ids: np.ndarray, n: int) -> np.ndarray:
    """(n + 1,) int32: each candidate id's position in R, or -1 (a lookup, not a search). Slot ``n``
    answers the id -1 of empty neighbour slots with -1."""
    where_in_r = np.full(n + 1, -1, dtype=np.int32)
    where_in_r[tail_ids] = np.arange(len(tail_ids), dtype=np.int32)
    return where_in_r


class _TailGemm:
    """The tail vectors R, ready for one GEMM per block of queries (``tail_sums``)."""

    def __init__(self, tail_vectors: np.ndarray, a: float, device: str, dtype: torch.dtype):
        self.a, self.dtype = a, dtype
        self.dev = resolve_device(device)
        self.np_dtype = np.float32 if dtype == torch.float32 else np.float64
        self.tv = np.ascontiguousarray(tail_vectors, dtype=self.np_dtype)
        self.tv_dev = None if self.dev.type == "cpu" else to_tensor(self.tv, self.dev, dtype)

    def scores(self, queries: np.ndarray) -> torch.Tensor:
        """(b, m) tail scores ``a <q, r>`` in the GEMM dtype."""
        if self.tv_dev is None:  # CPU: numpy's BLAS is the faster GEMM on the reference machine
            return torch.from_numpy((np.asarray(queries, dtype=self.np_dtype) * self.a) @ self.tv.T)
        return (to_tensor(queries, self.dev, self.dtype) * self.a) @ self.tv_dev.T

    def block_sums(self, queries: np.ndarray, top: np.ndarray, pos: np.ndarray | None):
        """One block's ``(tail_sum, tail_sum_s, shift, dropped)`` as float64 / int64 arrays.

        ``top`` is each query's best neighbour score; ``pos`` (b, k) the position in R of each of
        its neighbours (-1: not in R), whose terms are left out of its sums (``dropped`` counts
        them per query); None leaves nothing out.
        """
        f64 = torch.float64
        sc = self.scores(queries)
        sh = torch.maximum(torch.from_numpy(top).to(self.dev), sc.max(dim=1).values.to(f64))
        e = torch.exp(sc - sh.to(self.dtype)[:, None])
        dropped = 0
        if pos is not None:  # R ∩ K: the query's own neighbours are its head, not its tail
            rows, cols = np.nonzero(pos >= 0)
            if len(rows):
                hit = (torch.from_numpy(rows).to(e.device),
                       torch.from_numpy(pos[rows, cols].astype(np.int64)).to(e.device))
                e[hit] = 0
            dropped = np.bincount(rows, minlength=len(pos))
        # per-row sums of m terms in [0, 1] in the GEMM dtype (torch sums pairwise: relative
        # error ~1e-7 in float32, far below the sampling error), stored as float64
        t_sum = e.sum(dim=1).to(f64).cpu().numpy()
        t_sum_s = e.mul_(sc).sum(dim=1).to(f64).cpu().numpy()
        return t_sum, t_sum_s, sh.cpu().numpy(), dropped


# -- 3. the estimator in SQL ---------------------------------------------------------------------


def kl_from_lists(
    con,
    neighbours: pa.Table,
    tails: pa.Table,
    n: int,
    b: float | None = None,
) -> pa.Table:
    """Run ``sql/internal/kl_per_sample.sql`` over the two arrow tables (``queries.kl_sql``).

    Args:
        con: a DuckDB connection (the tables are registered on it as ``neighbours`` and ``tails``
            for the duration of the call, and the macro of ``sql/internal/kl_formula.sql`` created).
        neighbours: ``neighbour_table`` output.
        tails: ``tail_sums`` output, with the same neighbours excluded (``exclude=``).
        n: N, the number of candidates.
        b: SigLIP logit bias, or None (CLIP).

    Returns:
        Arrow table ``(query BIGINT, kl DOUBLE, klr DOUBLE)``, one row per row of ``tails``,
        ordered by query.
    """
    return run_kl_statement(con, "kl_per_sample", {"neighbours": neighbours, "tails": tails}, n, b)


def estimate_kl(
    index,
    queries: np.ndarray,
    candidates: np.ndarray,
    k: int,
    a: float,
    b: float | None = None,
    *,
    tail_ids: np.ndarray,
    nprobe: int | None = None,
    rescore: bool | None = None,
    query_ids: np.ndarray | None = None,
    own_ids: np.ndarray | None = None,
    cand_sum: np.ndarray | None = None,
    tail_vectors: np.ndarray | None = None,
    con=None,
    device: str = "auto",
    timings: dict[str, float] | None = None,
    prefix: str = "",
) -> pa.Table:
    """The whole estimator for one block of queries: neighbours, tail sums, SQL.

    Args:
        index: FAISS index over ``candidates``.
        queries: (q, d) normalised queries.
        candidates: (N, d) stored candidate embeddings.
        k: neighbours per query.
        a: logit scale.
        b: SigLIP logit bias, or None.
        tail_ids: R (``draw_tail``).
        nprobe: IVF lists to visit (None: the index's setting).
        rescore: rescore the neighbours exactly (default: when the index's scores are lossy).
        query_ids: the queries' vec_ids (default ``0..q-1``).
        own_ids: the candidate id of each query's own pair, always put in K (``search_neighbours``).
        cand_sum, tail_vectors: per-run constants (``candidate_sum(candidates)``,
            ``candidates[tail_ids]``), computed when not given.
        con: DuckDB connection for the SQL (default: a new in-memory one).
        device: torch device of the tail GEMM.
        timings: when given, seconds of the phases ``search``, ``table``, ``tail``, ``sql`` are added to it
            (keys prefixed with ``prefix``).

    Returns:
        Arrow table ``(query, kl, klr)`` ordered by query.
    """
    check_scale(a, b, len(candidates))
    qids = np.arange(len(queries), dtype=np.int64) if query_ids is None else np.asarray(query_ids, np.int64)
    clock = _Clock(timings, prefix)
    with clock("search"):
        nb = search_neighbours(index, queries, candidates, k, a, nprobe=nprobe, rescore_scores=rescore,
                               own_ids=own_ids)
    with clock("table"):
        neighbours = neighbour_table(qids, nb)
    with clock("tail"):
        tails = tail_sums(queries, candidates, tail_ids, a, nb.top, exclude=nb.ids, query_ids=qids,
                          cand_sum=cand_sum, tail_vectors=tail_vectors, device=device)
    with _connection(con) as con, clock("sql"):
        return kl_from_lists(con, neighbours, tails, len(candidates), b)


@contextlib.contextmanager
def _connection(con):
    """``con``, or a new in-memory DuckDB connection closed on leaving when ``con`` is None."""
    if con is not None:
        yield con
        return
    import duckdb

    own = duckdb.connect()
    try:
        yield own
    finally:
        own.close()


class _Clock:
    """Adds the seconds spent in ``with clock(name):`` blocks to ``timings[prefix + name]``."""

    def __init__(self, timings: dict[str, float] | None, prefix: str):
        self.timings, self.prefix = timings, prefix

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.timings is not None:
                key = self.prefix + name
                self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0


def dots_per_query(search_dots: float, k: int, m: int, rescored: bool, own_pair: bool = False) -> float:
    """Honest cost of the estimate per query, in d-dimensional dot products.

    ``search_dots`` (FAISS: ``indexer.choose.dots_per_query``) + ``m`` (tail) + ``k`` (rescoring,
    only when the index's scores are lossy) + 1 (the exact mean) + 1 (the own pair's score, when
    it is added to K).
    """
    return float(search_dots) + m + (k if rescored else 0) + 1 + (1 if own_pair else 0)


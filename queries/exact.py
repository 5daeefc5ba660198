"""Exact KL / KLR scores over the whole candidate set (SPEC 2), streamed in chunks with torch.

For a query ``q`` (normalised) and candidates ``v_1..v_N`` with ``s_j = a <v_q, v_j>``::

    D_KL  = sum_j p_j s_j - LSE + log N        p = softmax(s), LSE = logsumexp_j s_j
    D_KLR = LSE - log N - mean_j s_j

and, for SigLIP models with logit bias ``b`` (the reference code's "tau_b" option)::

    D_KL  = sum_j p_j s_j + log(N - 1) + b
    D_KLR = -log(N - 1) - b - mean_j s_j

The candidate axis is streamed with an online log-sum-exp: per query we keep the running maximum
``M``, ``S0 = sum e^{s - M}``, ``S1 = sum e^{s - M} s`` and ``sum s``; when a chunk raises the maximum
the sums are rescaled by ``e^{M_old - M_new}``. Nothing larger than ``chunk_q x chunk_n`` scores is
ever held, so a million candidates (float16 memmap) stream through a few hundred MB.

This is the ground truth for every accuracy claim, and ``--exact`` of ``score``. It costs ``N`` dot
products per query. :func:`sampled_softmax_kl` is the paper's own cheaper estimator (a full softmax
over a uniform sample of ``M`` candidates), kept for the benchmarks.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch

from clip_density_index.indexer.device import resolve_device
from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.indexer.progress import Progress, null_progress

log = logging.getLogger(__name__)

#: Default chunk sizes (queries x candidates per score block). CPU: 512 x 4096 float64 = 16 MB, a
#: block each elementwise pass (max, exp, sums) reads from cache rather than from memory: 1.4 ms per
#: query against 2.1-2.5 ms with 1024 x 16384 (128 MB) at N = 100k on 2 cores (BENCHMARKS.md).
#: GPUs get larger blocks.
CPU_CHUNKS = (512, 4096)
GPU_CHUNKS = (4096, 65536)


def to_tensor(x: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A (possibly memory-mapped, float16) numpy block as a contiguous tensor on ``device``.

    The tensor may share memory with a read-only memmap; callers only read it.
    """
    if isinstance(x, torch.Tensor):  # already a tensor (e.g. a pool drawn on the GPU)
        return x.to(device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype)


def check_scale(a: float, b: float | None, n_candidates: int) -> None:
    """Raise ``InvalidParameter`` for a non-positive scale, a non-finite bias or too few candidates."""
    if not (math.isfinite(a) and a > 0):
        raise InvalidParameter(f"logit scale must be a positive number, got {a!r}")
    if b is not None and not math.isfinite(b):
        raise InvalidParameter(f"logit bias must be a finite number, got {b!r}")
    need = 2 if b is not None else 1
    if n_candidates < need:
        raise InvalidParameter(f"need at least {need} candidate(s), got {n_candidates}")


def kl_from_moments(
    lse: np.ndarray, mean_p_s: np.ndarray, mean_s: np.ndarray, n: int, b: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """SPEC 2 from the three per-query moments.

    Args:
        lse: ``log sum_j e^{s_j}`` (or its estimate).
        mean_p_s: ``sum_j p_j s_j`` (the softmax-weighted mean score).
        mean_s: ``(1/N) sum_j s_j``.
        n: N, the number of candidates.
        b: SigLIP logit bias; ``None`` for CLIP.

    Returns:
        ``(kl, klr)`` float64 arrays.
    """
    if b is None:
        return mean_p_s - lse + math.log(n), lse - math.log(n) - mean_s
    return mean_p_s + math.log(n - 1) + b, -math.log(n - 1) - b - mean_s


def exact_kl(
    queries: np.ndarray,
    candidates: np.ndarray,
    a: float,
    b: float | None = None,
    *,
    chunk_q: int | None = None,
    chunk_n: int | None = None,
    device: str = "auto",
    dtype: torch.dtype | str = torch.float64,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact D_KL and D_KLR of every query against all candidates (SPEC 2).

    The row half of :func:`exact_moments` (one side); :func:`exact_kl_both` gives both sides from
    one pass.

    Args:
        queries: (q, d) normalised query embeddings.
        candidates: (N, d) normalised candidate embeddings; may be a float16/float32 memmap.
        a: logit scale (about 100 for CLIP).
        b: SigLIP logit bias; when given, the "tau_b" formulas are used.
        chunk_q, chunk_n: queries x candidates per score block (default ``CPU_CHUNKS`` /
            ``GPU_CHUNKS``).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        dtype: precision of the scores (``PRECISIONS``; float64 by default here, the reference).
        progress: hook advanced by the number of queries done.

    Returns:
        ``(kl, klr)``: float64 arrays of shape (q,).
    """
    check_scale(a, b, len(candidates))
    rows, _ = exact_moments(queries, candidates, a, rows=True, cols=False, chunk_q=chunk_q, chunk_n=chunk_n,
                            device=device, precision=dtype, progress=progress)
    mean_s = a * (np.asarray(queries, np.float64) @ candidate_sum(candidates)) / max(len(candidates), 1)
    return rows.kl(mean_s, len(candidates), b)


def exact_kl_both(
    texts: np.ndarray,
    images: np.ndarray,
    a: float,
    b: float | None = None,
    *,
    device: str = "auto",
    precision: torch.dtype | str = "float32",
    chunk_q: int | None = None,
    chunk_n: int | None = None,
    progress: Progress | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Exact KL / KLR of both sides from one pass over ``S = a T I'`` (texts x images).

    The text side needs S's row reductions (a caption against every image), the image side its
    column reductions (an image against every caption): one GEMM per block serves both.

    Returns:
        ``{"text": (kl, klr), "image": (kl, klr)}``, float64 arrays of shape (n,).
    """
    check_scale(a, b, min(len(texts), len(images)))
    rows, cols = exact_moments(texts, images, a, rows=True, cols=True, chunk_q=chunk_q, chunk_n=chunk_n,
                               device=device, precision=precision, progress=progress)
    t_sum, i_sum = candidate_sum(texts), candidate_sum(images)
    mean_text = a * (np.asarray(texts, np.float64) @ i_sum) / len(images)
    mean_image = a * (np.asarray(images, np.float64) @ t_sum) / len(texts)
    return {"text": rows.kl(mean_text, len(images), b), "image": cols.kl(mean_image, len(texts), b)}


#: Score precisions. The GEMM runs in this dtype; exponentials and block sums in float32 (float64
#: for "float64"); partials merge in float64. float16 / bfloat16 are for GPUs (on this project's
#: reference CPU torch's bfloat16 GEMM ran 5x slower than float32: BENCHMARKS.md).
PRECISIONS = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
              "bfloat16": torch.bfloat16}
#: Candidate blocks are staged on the device once (converted to the GEMM dtype) when they take at
#: most this many bytes; larger pools are converted block by block on every pass.
STAGE_BYTES = 4 << 30


def stage(array: np.ndarray, device: str | torch.device, precision: torch.dtype | str,
          block: int = 1 << 18) -> torch.Tensor:
    """The whole ``array`` as one tensor on ``device`` in the GEMM dtype, copied block by block
    (a float16 memmap is never materialised whole in host memory). Score runs on a GPU stage the
    candidates once instead of once per chunk of queries."""
    dtype = _precision(precision)
    dev = torch.device(device)
    out = torch.empty(tuple(array.shape), dtype=dtype, device=dev)
    for s in range(0, len(array), block):
        out[s : s + block] = to_tensor(array[s : s + block], dev, dtype)
    return out


def _precision(p: torch.dtype | str) -> torch.dtype:
    if isinstance(p, torch.dtype) and p in PRECISIONS.values():
        return p
    if isinstance(p, str) and p in PRECISIONS:
        return PRECISIONS[p]
    raise InvalidParameter(f"precision must be one of {', '.join(PRECISIONS)}, got {p!r}")


class Moments:
    """Per-query softmax partials that merge associatively: ``max``, ``s0 = sum e^(s - max)`` and
    ``s1 = sum e^(s - max) s``, float64 arrays. ``lse = max + log s0``, ``E_p[s] = s1 / s0``."""

    def __init__(self, n: int):
        self.max = np.full(n, -np.inf)
        self.s0 = np.zeros(n)
        self.s1 = np.zeros(n)

    @classmethod
    def of(cls, mx: np.ndarray, s0: np.ndarray, s1: np.ndarray) -> "Moments":
        m = cls(0)
        m.max, m.s0, m.s1 = (np.array(x, np.float64) for x in (mx, s0, s1))  # own, writable copies
        return m

    def merge(self, sl, mx: np.ndarray, s0: np.ndarray, s1: np.ndarray) -> None:
        """Fold a block's partials (relative to their own ``mx``) into rows ``sl``."""
        old = self.max[sl]
        new = np.maximum(old, mx)
        keep, add = np.exp(old - new), np.exp(mx - new)  # e^-inf = 0 on the first block
        self.s0[sl] = self.s0[sl] * keep + s0 * add
        self.s1[sl] = self.s1[sl] * keep + s1 * add
        self.max[sl] = new

    def merge_all(self, other: "Moments") -> None:
        self.merge(slice(None), other.max, other.s0, other.s1)

    def kl(self, mean_s: np.ndarray, n: int, b: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """SPEC 2 over ``n`` candidates, with ``mean_s`` the exact mean score of each query."""
        return kl_from_moments(self.max + np.log(self.s0), self.s1 / self.s0, mean_s, n, b)

    def kl_into(self, kl: np.ndarray, klr: np.ndarray, mean_s: np.ndarray, n: int, b: float | None = None,
                block: int = 1 << 20) -> None:
        """``kl`` written into the arrays ``kl`` and ``klr`` (e.g. a run's column files) ``block``
        queries at a time: the same values, with no temporary as long as all the queries."""
        for s in range(0, len(self.max), block):
            sl = slice(s, s + block)
            kl[sl], klr[sl] = Moments.of(self.max[sl], self.s0[sl], self.s1[sl]).kl(mean_s[sl], n, b)


def exact_moments(
    queries: np.ndarray,
    candidates: np.ndarray,
    a: float,
    *,
    rows: bool = True,
    cols: bool = False,
    chunk_q: int | None = None,
    chunk_n: int | None = None,
    device: str = "auto",
    precision: torch.dtype | str = "float32",
    progress: Progress | None = None,
) -> tuple[Moments | None, Moments | None]:
    """The softmax partials of ``S = a Q C'`` along its rows (each query over all candidates) and /
    or its columns (each candidate over these queries), in one blocked pass.

    Per block of S the row partials take one exponential ``e = exp(S - rowmax)``; the column
    partials reuse it, weighted by ``w_i = exp(rowmax_i - c)`` with ``c`` the block's maximum: two
    matrix-vector products ``w' e`` and ``w' (e * S)``. A column whose block sum falls below
    ``exp(-log(max float) / 2)`` of ``c`` (all its scores far below the block's best, where float32
    would lose them) is recomputed with its own maximum. Column partials over a subset of the
    queries merge with ``Moments.merge_all``: a pool scored in resumable query chunks merges the
    chunks' column partials.

    Returns:
        ``(row_moments or None, column_moments or None)``.
    """
    q, n = len(queries), len(candidates)
    dtype = _precision(precision)
    dev = resolve_device(device)
    chunk_q, chunk_n = _chunk_sizes(dev, chunk_q, chunk_n)
    row_m = Moments(q) if rows else None
    col_m = Moments(n) if cols else None
    if q == 0 or n == 0:
        return row_m, col_m
    work = torch.float64 if dtype == torch.float64 else torch.float32  # exponentials and sums
    floor, tiny = _exp_limits(work)
    staged = _stage_blocks(candidates, dev, dtype, chunk_n)
    with (progress or null_progress)("exact KL", q) as advance:
        for q0 in range(0, q, chunk_q):
            qa = (to_tensor(queries[q0 : q0 + chunk_q], dev, torch.float64) * a).to(dtype)
            for bi, c0 in enumerate(range(0, n, chunk_n)):
                cand = staged[bi] if staged is not None else to_tensor(candidates[c0 : c0 + chunk_n], dev, dtype)
                s = _scores(qa, cand, work)
                rmax = s.amax(dim=1)
                e = torch.sub(s, rmax[:, None]).clamp_(min=floor).exp_()
                es = e * s
                if rows:
                    row_m.merge(slice(q0, q0 + chunk_q), _np(rmax), _np(e.sum(dim=1)), _np(es.sum(dim=1)))
                if cols:
                    col_m.merge(slice(c0, c0 + chunk_n), *_column_partials(s, rmax, e, es, floor, tiny))
            advance(min(chunk_q, q - q0))
    return row_m, col_m


def _chunk_sizes(dev: torch.device, chunk_q: int | None, chunk_n: int | None) -> tuple[int, int]:
    """The queries x candidates of a score block: the given sizes, else the device's defaults."""
    dq, dn = GPU_CHUNKS if dev.type == "cuda" else CPU_CHUNKS
    chunk_q, chunk_n = int(chunk_q or dq), int(chunk_n or dn)
    if chunk_q < 1 or chunk_n < 1:
        raise InvalidParameter(f"chunk sizes must be >= 1, got chunk_q={chunk_q}, chunk_n={chunk_n}")
    return chunk_q, chunk_n


def _exp_limits(work: torch.dtype) -> tuple[float, float]:
    """``(floor, tiny)`` for exponentials in ``work`` precision.

    e^x for x below ``floor`` is taken as e^floor: relative to a row's largest term it is < 1e-34
    (float32), far below the rounding of the sums; exponentials that underflow run ~11x slower on
    this x86 CPU (BENCHMARKS.md section 1), so clamping first is the faster path. A column whose
    block sum falls below ``tiny`` is recomputed with its own maximum (``_column_partials``).
    """
    big = math.log(torch.finfo(work).max)
    return -0.9 * big, math.exp(-big / 2)


def _stage_blocks(candidates: np.ndarray, dev: torch.device, dtype: torch.dtype,
                  chunk_n: int) -> list[torch.Tensor] | None:
    """The candidate blocks on ``dev`` in the GEMM dtype, converted once, when they fit in
    ``STAGE_BYTES`` (on a GPU: in half of its free memory when that is more); else None (every pass
    converts its blocks again)."""
    n = len(candidates)
    budget = STAGE_BYTES
    if dev.type == "cuda":  # a GPU holds far more: half of what is free now
        budget = max(budget, torch.cuda.mem_get_info(dev)[0] // 2)
    if n * candidates.shape[1] * torch.finfo(dtype).bits // 8 > budget:
        return None
    return [to_tensor(candidates[c0 : c0 + chunk_n], dev, dtype) for c0 in range(0, n, chunk_n)]


def _column_partials(s: torch.Tensor, rmax: torch.Tensor, e: torch.Tensor, es: torch.Tensor, floor: float,
                     tiny: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One block's column partials ``(max, s0, s1)`` from its row exponentials ``e = exp(s - rmax)``.

    Each row is weighted by ``w_i = exp(rmax_i - c)`` with ``c`` the block's maximum: two
    matrix-vector products ``w' e`` and ``w' (e * s)``, relative to ``c``. A column whose sum falls
    below ``tiny`` (all its scores far below the block's best) is recomputed with its own maximum.
    """
    c = rmax.max()
    w = torch.exp(rmax - c)
    c0s, c1s, cmax = w @ e, w @ es, c.expand(s.shape[1]).clone()
    low = c0s < tiny
    if bool(low.any()):  # columns far below the block's best: their own shift
        sub = s[:, low]
        m2 = sub.amax(dim=0)
        e2 = torch.sub(sub, m2[None, :]).clamp_(min=floor).exp_()
        c0s[low], c1s[low], cmax[low] = e2.sum(dim=0), (e2 * sub).sum(dim=0), m2
    return _np(cmax), _np(c0s), _np(c1s)


def _scores(qa: torch.Tensor, cand: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """``qa @ cand.T`` with the result in ``work`` precision (float32 out of a float16 GEMM where
    the device supports it)."""
    if qa.dtype in (torch.float16, torch.bfloat16) and qa.is_cuda:
        try:
            return torch.mm(qa, cand.T, out_dtype=work)
        except (RuntimeError, TypeError):
            pass
    return (qa @ cand.T).to(work)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).cpu().numpy()


def candidate_sum(candidates: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """``sum_j v_j`` over all candidates in float64, read chunk by chunk (memmap friendly)."""
    total = np.zeros(candidates.shape[1], dtype=np.float64)
    for s in range(0, len(candidates), chunk):
        total += np.asarray(candidates[s : s + chunk], dtype=np.float64).sum(axis=0)
    return total


def sample_ids(n: int, m: int, seed: int) -> np.ndarray:
    """``m`` distinct ids drawn uniformly from ``range(n)`` (seeded), sorted, int64."""
    if not 0 <= m <= n:
        raise InvalidParameter(f"sample size must be between 0 and N={n}, got {m}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=m, replace=False)).astype(np.int64)


def sampled_softmax_kl(
    queries: np.ndarray,
    candidates: np.ndarray,
    a: float,
    M: int,
    seed: int = 0,
    b: float | None = None,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's own estimator: the full softmax over one uniform random sample of ``M`` candidates.

    The sample is drawn once (seeded) and shared by every query; ``log M`` (``log(M - 1)`` for
    SigLIP) takes the place of ``log N``. Costs ``M`` dot products per query. The paper used
    ``M`` = 0.2% of the pool. Extra keyword arguments go to :func:`exact_kl`.

    Returns:
        ``(kl, klr)``: float64 arrays of shape (q,).
    """
    ids = sample_ids(len(candidates), int(M), seed)
    return exact_kl(queries, np.asarray(candidates[ids]), a, b, **kwargs)

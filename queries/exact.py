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

from indexer.errors import InvalidParameter
from indexer.progress import Progress, null_progress

log = logging.getLogger(__name__)

#: Default chunk sizes (queries x candidates per score block). CPU: 512 x 4096 float64 = 16 MB, a
#: block each elementwise pass (max, exp, sums) reads from cache rather than from memory: 1.4 ms per
#: query against 2.1-2.5 ms with 1024 x 16384 (128 MB) at N = 100k on 2 cores (BENCHMARKS.md).
#: GPUs get larger blocks.
CPU_CHUNKS = (512, 4096)
GPU_CHUNKS = (4096, 65536)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` means CUDA when torch sees a GPU, else CPU (``indexer.device.resolve_device``)."""
    from indexer.device import resolve_device as resolve

    return torch.device(resolve(device))


def to_tensor(x: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A (possibly memory-mapped, float16) numpy block as a contiguous tensor on ``device``.

    The tensor may share memory with a read-only memmap; callers only read it.
    """
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
    dtype: torch.dtype = torch.float64,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact D_KL and D_KLR of every query against all candidates (SPEC 2).

    Args:
        queries: (q, d) normalised query embeddings.
        candidates: (N, d) normalised candidate embeddings; may be a float16/float32 memmap. It is
            read once per call, chunk by chunk.
        a: logit scale (about 100 for CLIP).
        b: SigLIP logit bias; when given, the "tau_b" formulas are used.
        chunk_q: queries per score block (default 1024 on CPU, 4096 on GPU).
        chunk_n: candidates per score block (default 16384 on CPU, 65536 on GPU).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        dtype: ``torch.float64`` (default, for correctness) or ``torch.float32`` (faster; the
            running max-shift keeps every exponential <= 1, sums still accumulate in float64).
        progress: hook advanced by the number of candidates processed.

    Returns:
        ``(kl, klr)``: float64 arrays of shape (q,).
    """
    q, n = len(queries), len(candidates)
    check_scale(a, b, n)
    if dtype not in (torch.float64, torch.float32):
        raise InvalidParameter(f"dtype must be torch.float64 or torch.float32, got {dtype!r}")
    dev = resolve_device(device)
    dq, dn = GPU_CHUNKS if dev.type == "cuda" else CPU_CHUNKS
    chunk_q, chunk_n = int(chunk_q or dq), int(chunk_n or dn)
    if chunk_q < 1 or chunk_n < 1:
        raise InvalidParameter(f"chunk sizes must be >= 1, got chunk_q={chunk_q}, chunk_n={chunk_n}")
    if q == 0:
        return np.zeros(0), np.zeros(0)

    f64 = torch.float64
    qa = to_tensor(queries, dev, dtype) * a  # s = (a q) . c
    run_max = torch.full((q,), -math.inf, dtype=f64, device=dev)
    s0 = torch.zeros(q, dtype=f64, device=dev)  # sum e^{s - max}
    s1 = torch.zeros(q, dtype=f64, device=dev)  # sum e^{s - max} s
    ssum = torch.zeros(q, dtype=f64, device=dev)  # sum s
    with (progress or null_progress)("exact KL", n) as advance:
        for c0 in range(0, n, chunk_n):
            cand = to_tensor(candidates[c0 : c0 + chunk_n], dev, dtype)
            for q0 in range(0, q, chunk_q):
                sl = slice(q0, q0 + chunk_q)
                s = qa[sl] @ cand.T  # (cq, cn) scores
                new_max = torch.maximum(run_max[sl], s.max(dim=1).values.to(f64))
                rescale = torch.exp(run_max[sl] - new_max)  # 0 on the first chunk (e^-inf)
                e = torch.exp(s - new_max.to(dtype)[:, None])
                s0[sl] = s0[sl] * rescale + e.sum(dim=1, dtype=f64)
                s1[sl] = s1[sl] * rescale + (e.mul_(s)).sum(dim=1, dtype=f64)
                ssum[sl] += s.sum(dim=1, dtype=f64)
                run_max[sl] = new_max
            advance(len(cand))
    lse = (run_max + torch.log(s0)).cpu().numpy()
    mean_p_s = (s1 / s0).cpu().numpy()
    mean_s = (ssum / n).cpu().numpy()
    return kl_from_moments(lse, mean_p_s, mean_s, n, b)


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

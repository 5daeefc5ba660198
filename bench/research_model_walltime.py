"""Research (issue 3): CPU wall time of the calibrated model-tail estimator, on a real FAISS IVF-PQ.

``bench/research_pq_head.py --model-tail --m-unprobed 0 --order model --model-probed --item-var
--plan 216:2300:0 --calib 100`` meets the accuracy target in simulation (BENCHMARKS.md section 0).
The simulation reads exact scores from a precomputed matrix, so it says nothing about time. This
script runs the same design on FAISS and numpy and times it per query, next to the exact method
(float32 torch GEMM, log-sum-exp and expectation over all n) on the same queries and threads:

* build (not timed): the query-whitened space (x Sigma^(1/2)), k-means lists (1024), an
  ``IndexIVFPQ`` (PQ32x8 of the residuals, inner product) whose quantizer holds those centroids, one
  float per item (its PQ error's squared norm over the mean), the per-list model statistics;
* per query batch (timed): rank-64 centroid scores, q' Sw q and q' Sr q (rank 64), the model's
  probe order, FAISS ``range_search_preassigned`` over the 216 chosen lists with no radius (every
  scanned item's ADC score; FAISS ``search`` would keep only the top k, and the model needs them
  all), per query the head by expected mass (the best 2300), their exact rescoring (gathered rows),
  the probed-tail and unprobed-list models, kl and klr.

The variance scales are fixed at the values the simulation's calibration chose (0.975 probed, 0.9
unprobed), so the calibration itself (100 exact rows, ~0.1% of an exact run) is not timed. The
accuracy against the exact values is printed as a check that it behaves like the simulated
estimator: close, not identical (here the residuals are taken from the k-means centroids, there
from the list means, and the PQ is trained on other residuals).

    python -m bench.research_model_walltime --threads 1
    python -m bench.research_model_walltime --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

A = 100.0
LISTS = 1024
RANK = 64
M, NB = 32, 8
PROBES, HEAD = 216, 2300
GAMMA_PROBED, GAMMA_UNPROBED = 0.975, 0.9


def low_rank(cov: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(top eigenvectors, their eigenvalues minus the rest, the rest's mean eigenvalue) of cov."""
    w, U = np.linalg.eigh(cov)
    w, U = w[::-1], U[:, ::-1]
    rest = float(w[rank:].mean())
    return U[:, :rank].astype(np.float32), (w[:rank] - rest).astype(np.float32), rest


def quad(Q: np.ndarray, model: tuple) -> np.ndarray:
    """a^2 q' C q for each row q of Q, C in low rank + isotropic rest."""
    U, w, rest = model
    return (((Q @ U) ** 2) @ w + rest * (Q * Q).sum(1)).astype(np.float64) * A * A


def build(X: np.ndarray, T: np.ndarray) -> dict:
    import faiss

    from bench.research_ivf_model_tail import list_means
    from bench.research_pq_head import query_whitening, whitened_kmeans

    n, d = X.shape
    half, inv_half = query_whitening(T)
    Xw = X @ half
    rng = np.random.default_rng(0)
    km = whitened_kmeans(Xw, LISTS, rng.choice(n, 64 * LISTS, replace=False))
    Cq = km.centroids.copy()
    quantizer = faiss.IndexFlatL2(d)  # assignment = the k-means one (nearest centroid in the whitened space)
    quantizer.add(Cq)
    index = faiss.IndexIVFPQ(quantizer, d, LISTS, M, NB, faiss.METRIC_INNER_PRODUCT)
    index.train(Xw[rng.choice(n, 30000, replace=False)])  # the quantizer is full: trains the residual PQ only
    index.add(Xw)
    # each item's list and reconstruction -> its PQ error, the error covariance, the per-item variance shares
    invlists = index.invlists
    approx = np.empty_like(Xw)
    assign = np.empty(n, np.int64)
    for lst in range(LISTS):
        size = invlists.list_size(lst)
        if size == 0:
            continue
        ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy()
        codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * index.code_size).copy()
        approx[ids] = Cq[lst] + index.pq.decode(codes.reshape(size, index.code_size))
        assign[ids] = lst
    sizes = np.bincount(assign, minlength=LISTS)
    err = Xw - approx
    err_model = low_rank((err.astype(np.float64).T @ err) / n, RANK)
    err2 = (err.astype(np.float64) ** 2).sum(1)
    share_item = (err2 / err2.mean()).astype(np.float32)
    C = list_means(X, assign, LISTS)  # the lists' means in the original space
    resid = (X - C[assign]).astype(np.float64)
    Sw = (resid.T @ resid) / n
    trace = np.bincount(assign, weights=(resid ** 2).sum(1), minlength=LISTS)
    share_list = trace / np.maximum(sizes, 1) / np.trace(Sw)
    mu = C.mean(0)
    _, _, Vt = np.linalg.svd(C - mu, full_matrices=False)
    B = Vt[:RANK].astype(np.float32)
    return {
        "index": index, "inv_half": inv_half, "X": X, "sizes": sizes.astype(np.float64),
        "share_item": share_item, "share_list": share_list, "err_model": err_model,
        "within_model": low_rank(Sw, RANK), "mu": mu.astype(np.float32), "B": B,
        "CB": ((C - mu) @ B.T).astype(np.float32), "Cq": Cq, "xsum": X.sum(0, dtype=np.float64),
    }


TIMES = {"faiss_scan": 0.0}


def estimate(m: dict, Q: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """kl and klr of each query (rows of Q, unit captions) against every image."""
    index, X = m["index"], m["X"]
    n = X.shape[0]
    nq = len(Q)
    cscore = ((Q @ m["B"].T) @ m["CB"].T + (Q @ m["mu"])[:, None]) * np.float32(A)  # rank-64 list means
    qv = quad(Q, m["within_model"])
    v_l = GAMMA_UNPROBED * m["share_list"][None] * qv[:, None]
    log_mass = np.log(np.maximum(m["sizes"], 1))[None] + cscore + v_l / 2
    probes = np.argpartition(-log_mass, PROBES - 1, axis=1)[:, :PROBES].astype(np.int64)
    Qw = np.ascontiguousarray(Q @ m["inv_half"])
    qv_r = quad(Qw, m["err_model"])
    Dq = np.take_along_axis(Qw @ m["Cq"].T, probes, 1).astype(np.float32)  # <Qw, c_l>: the IP scanner's list term
    index.nprobe = PROBES
    t0 = time.perf_counter()
    lims, D, I = index.range_search_preassigned(Qw, -1e30, probes, Dq)
    TIMES["faiss_scan"] += time.perf_counter() - t0
    kl = np.empty(nq)
    klr = np.empty(nq)
    mean_s = A * (Q.astype(np.float64) @ m["xsum"]) / n
    unprobed = np.ones((nq, LISTS), bool)
    np.put_along_axis(unprobed, probes, False, 1)
    mv = cscore.astype(np.float64)
    z_l = np.where(unprobed, m["sizes"][None] * np.exp(np.where(unprobed, mv + v_l / 2, 0.0)), 0.0)
    z_unp = z_l.sum(1)
    zs_unp = (z_l * (mv + v_l)).sum(1)
    logn = math.log(n)
    for i in range(nq):
        ids = I[lims[i]:lims[i + 1]]
        proxy = D[lims[i]:lims[i + 1]].astype(np.float64) * A
        v = (GAMMA_PROBED * qv_r[i]) * m["share_item"][ids]
        head = np.argpartition(-(proxy + v / 2), HEAD - 1)[:HEAD]
        rest = np.ones(len(ids), bool)
        rest[head] = False
        rest &= ids != own[i]
        hid = np.union1d(ids[head], own[i:i + 1])
        s = (X[hid] @ Q[i]).astype(np.float64) * A
        shift = s.max()
        e = np.exp(s - shift)
        ep = np.exp(proxy[rest] + v[rest] / 2 - shift)
        z = e.sum() + ep.sum() + z_unp[i] * math.exp(-shift)
        zs = (e * s).sum() + (ep * (proxy[rest] + v[rest])).sum() + zs_unp[i] * math.exp(-shift)
        lz = math.log(z) + shift
        kl[i] = zs / z - lz + logn
        klr[i] = lz - logn - mean_s[i]
    return kl, klr


def exact(X: np.ndarray, Q: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The exact method's work in float32 (GEMM, log-sum-exp, expectation): what it costs at best."""
    import torch

    Xt = torch.from_numpy(X)
    n = X.shape[0]
    kl, klr = [], []
    for b in range(0, len(Q), chunk):
        s = (torch.from_numpy(Q[b:b + chunk]) @ Xt.T) * A
        lz = torch.logsumexp(s, 1)
        p = torch.exp(s - lz[:, None])
        kl.append(((p * s).sum(1) - lz + math.log(n)).double().numpy())
        klr.append((lz - math.log(n) - s.mean(1)).double().numpy())
    return np.concatenate(kl), np.concatenate(klr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="query set (bench/research_pq_head.py's)")
    ap.add_argument("--batch", type=int, default=250)
    args = ap.parse_args()
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[v] = str(args.threads)
    import faiss
    import torch

    from bench.research_pq_head import prepare
    from queries.score import spearman, top_overlap

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    data = prepare(args.seed)
    X, T, qids = data["image"], data["text"], data["qids"]
    t0 = time.perf_counter()
    model = build(X, T)
    t_build = time.perf_counter() - t0
    Q = np.ascontiguousarray(T[qids])
    t0 = time.perf_counter()
    parts = [estimate(model, Q[b:b + args.batch], qids[b:b + args.batch]) for b in range(0, len(Q), args.batch)]
    t_model = time.perf_counter() - t0
    kl, klr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    t0 = time.perf_counter()
    exact(X, Q)
    t_exact = time.perf_counter() - t0
    print(json.dumps({
        "threads": args.threads, "seed": args.seed, "queries": len(Q), "n": len(X), "build_s": round(t_build, 1),
        "model_ms_per_query": round(1000 * t_model / len(Q), 3),
        "of_which_faiss_scan_ms": round(1000 * TIMES["faiss_scan"] / len(Q), 3), "exact_ms_per_query": round(1000 * t_exact / len(Q), 3),
        "spearman_kl": round(spearman(kl, data["kl"]), 4), "top25_kl": round(top_overlap(kl, data["kl"]), 3),
        "spearman_klr": round(spearman(klr, data["klr"]), 4), "top25_klr": round(top_overlap(klr, data["klr"]), 3),
        "mae_kl": round(float(np.abs(kl - data["kl"]).mean()), 3),
    }))


if __name__ == "__main__":
    main()

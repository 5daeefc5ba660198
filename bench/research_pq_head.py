"""Research simulation (issue 3's accuracy target): how far can a cheaper-than-a-dot candidate scan go?

Not the product's estimator: a simulation of a candidate generator that could replace the IVF-Flat
head, to learn whether the "Spearman >= 0.999 at <= 5% of the exact dot products" target is within
reach of the top-k + tail family on the calibrated synthetic world (n = 100k, 1000 caption queries).
Result (2026-11-23, BENCHMARKS.md section 1): no; the best design found reaches kl 0.998 / klr 0.9998.

The design (cost in dot-product equivalents per query, a d-dim dot = 1):

1. offline: Sigma = E[t t^T] over the captions; k-means (L = 1024) of the images in the query-aware
   space x Sigma^(1/2); a rank-64 PCA of the centroids; a PQ (M sub-quantizers x NB bits) of the
   residuals in that space;
2. per query: centroid scores in rank 64 (1024 * 64 / 512 + 64 = 192), the query mapped to
   Sigma^(-1/2) q (512), the PQ lookup table (2^NB), approximate scores of the items of the P best
   lists (items * M / d), exact rescoring of the best ``kr`` of them plus the own pair (kr + 1) as the
   head; the tail: m - m2 importance samples (with replacement) among the probed items outside the
   head with p = 0.9 softmax(beta * approx score) + 0.1 uniform, plus m2 uniform samples of the
   unprobed items (m dots); the exact mean score (1).

Exact dot products are read from the precomputed exact score matrix (numerically the same as
computing them); the approximate scores equal FAISS's asymmetric distances (q . decode(code)).

    python -m bench.research_pq_head                 # PQ32x8, P 224, kr 1800, m 700 (m2 250), beta 0.75
    python -m bench.research_pq_head --seed 1        # another 1000 queries
    python -m bench.research_pq_head --pq 32:4 --plan 192:2000:1000

One thread, ~2 minutes per run after a one-time preparation (~2 minutes; files in bench/out/research).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

OUT = Path("bench/out/research")
A = 100.0
N = 100_000
LISTS = 1024


def prepare(seed: int) -> dict:
    """World embeddings, 1000 random caption queries, their exact KL and exact score rows (cached)."""
    from bench.common import world
    from queries.exact import exact_kl

    OUT.mkdir(parents=True, exist_ok=True)
    if not (OUT / "image.npy").exists():
        _, image, text = world(N, "calibrated")
        np.save(OUT / "image.npy", image)
        np.save(OUT / "text.npy", text)
    image, text = np.load(OUT / "image.npy"), np.load(OUT / "text.npy")
    qfile = OUT / f"queries-{seed}.npz"
    if not qfile.exists():
        qids = np.sort(np.random.default_rng([seed, 5]).choice(N, size=1000, replace=False)).astype(np.int64)
        q = np.ascontiguousarray(text[qids])
        kl, klr = exact_kl(q, image, A, device="cpu")
        np.savez(qfile, qids=qids, kl=kl, klr=klr, S=(q @ image.T).astype(np.float32))
    z = np.load(qfile)
    return {"image": image, "text": text, "qids": z["qids"], "kl": z["kl"], "klr": z["klr"], "S": z["S"] * np.float32(A)}


def run(seed: int, M: int, NB: int, P: int, kr: int, m: int, m2: int, beta: float) -> dict:
    import faiss

    from queries.score import spearman, top_overlap

    faiss.omp_set_num_threads(1)
    data = prepare(seed)
    X, T, S = data["image"], data["text"], data["S"]
    n, d = X.shape
    qids = data["qids"]
    Q = np.ascontiguousarray(T[qids])
    nq = len(Q)
    sig = (T.astype(np.float64).T @ T) / len(T)
    w, U = np.linalg.eigh(sig)
    half = ((U * np.sqrt(w)) @ U.T).astype(np.float32)
    inv_half = ((U / np.sqrt(w)) @ U.T).astype(np.float32)
    Xw = X @ half
    rng = np.random.default_rng(0)
    km = faiss.Kmeans(d, LISTS, niter=20, seed=1)
    km.train(Xw[rng.choice(n, 64 * LISTS, replace=False)])
    _, assign = km.index.search(Xw, 1)
    assign = assign[:, 0]
    Cw = np.stack([Xw[assign == i].mean(0) for i in range(LISTS)]).astype(np.float32)
    C = Cw @ inv_half
    mu = C.mean(0)
    _, _, Vt = np.linalg.svd(C - mu, full_matrices=False)
    B = Vt[:64]
    order = np.argsort(-(((C - mu) @ B.T) @ (B @ Q.T)).T, axis=1)  # lists by rank-64 centroid score
    mean_s = A * (Q.astype(np.float64) @ X.astype(np.float64).sum(0)) / n
    logn = math.log(n)
    own = np.zeros((nq, n), bool)
    own[np.arange(nq), qids] = True
    pq = faiss.ProductQuantizer(d, M, NB)
    resid = Xw - Cw[assign]
    pq.train(resid[rng.choice(n, 30000, replace=False)])
    approx_x = Cw[assign] + pq.decode(pq.compute_codes(resid))
    Sh = ((Q @ inv_half) @ approx_x.T) * np.float32(A)  # approximate scores (ADC)
    probed = np.zeros((nq, LISTS), bool)
    np.put_along_axis(probed, order[:, :P], True, 1)
    in_probe = probed[:, assign]
    scanned = float(in_probe.sum(1).mean())
    Sh_p = np.where(in_probe, Sh, -np.inf)
    th = -np.partition(-Sh_p, kr - 1, axis=1)[:, kr - 1 : kr]
    head = (in_probe & (Sh_p >= th)) | own
    dots = 192 + 512 + 2**NB + scanned * M / d + kr + 2 + m
    kl = np.empty(nq)
    klr = np.empty(nq)
    g = np.random.default_rng([seed, 11])
    eps, m1 = 0.1, m - m2
    for i in range(nq):
        s = S[i].astype(np.float64)
        h = head[i]
        e = np.exp(s)
        z, zs = e[h].sum(), (e[h] * s[h]).sum()
        u1 = np.flatnonzero(in_probe[i] & ~h)
        u2 = np.flatnonzero(~in_probe[i] & ~h)
        lw = beta * Sh[i, u1].astype(np.float64)
        pw = np.exp(lw - lw.max())
        p = (1 - eps) * pw / pw.sum() + eps / len(u1)
        j = g.choice(len(u1), m1, p=p)
        wgt = 1.0 / (m1 * p[j])
        ej = e[u1[j]]
        z += (wgt * ej).sum()
        zs += (wgt * ej * s[u1[j]]).sum()
        if len(u2):
            j2 = u2[g.choice(len(u2), min(m2, len(u2)), replace=False)]
            f = len(u2) / len(j2)
            z += f * e[j2].sum()
            zs += f * (e[j2] * s[j2]).sum()
        lz = math.log(z)
        kl[i] = zs / z - lz + logn
        klr[i] = lz - logn - mean_s[i]
    return {
        "seed": seed, "pq": f"PQ{M}x{NB}", "lists_probed": P, "rescored": kr, "m": m, "m_unprobed": m2,
        "beta": beta, "scanned_items": round(scanned), "dots_per_query": round(dots),
        "percent_of_n": round(100 * dots / n, 2),
        "spearman_kl": round(spearman(kl, data["kl"]), 4), "top25_kl": round(top_overlap(kl, data["kl"]), 3),
        "spearman_klr": round(spearman(klr, data["klr"]), 4), "top25_klr": round(top_overlap(klr, data["klr"]), 3),
        "mae_kl": round(float(np.abs(kl - data["kl"]).mean()), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="query seed (1000 random captions)")
    ap.add_argument("--pq", default="32:8", help="M:bits of the residual PQ")
    ap.add_argument("--plan", default="224:1800:700", help="lists probed : rescored : tail m")
    ap.add_argument("--m-unprobed", type=int, default=250, help="of m, uniform samples of unprobed items")
    ap.add_argument("--beta", type=float, default=0.75, help="importance-sampling temperature")
    args = ap.parse_args()
    M, NB = (int(x) for x in args.pq.split(":"))
    P, kr, m = (int(x) for x in args.plan.split(":"))
    print(json.dumps(run(args.seed, M, NB, P, kr, m, args.m_unprobed, args.beta)))


if __name__ == "__main__":
    main()

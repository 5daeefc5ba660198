"""Research simulation (issue 3): the product's IVF-Flat head with SPEC section 3's tail or a model tail.

Not the product's estimator. It asks whether the IVF-Flat index ``score`` uses could get closer to
the accuracy target with (a) lists clustered in a query-aware space and (b) a per-list model of the
unprobed lists instead of the uniform tail sample. Same calibrated world (n = 100k), 1000 caption
queries, exact reference and cost rules as ``bench/research_pq_head.py`` (d-dim dot = 1).

Lists (``--space``): ``image``, the product's (FAISS IVF on the images, inner product), or
``whitened``: k-means of the images in the space x Sigma^(1/2), Sigma = E[t t^T] over the captions,
with the lists' original-space means as the centroids a FAISS IP quantizer would hold.

Per query, the P probed lists (``--order centroid``: by <q, centroid>, what FAISS does; ``model``: by
the model's expected mass, log n_l + m_l + v_l / 2) are scanned exactly. Estimators:

* ``spec``: SPEC section 3, K = the best k = 256 scanned items plus the own pair, the shared uniform
  R of m = 2048 (R \\ K reweighted). Cost: lists + scanned + m + 2.
* ``specall``: the same with K = every scanned item (no extra dots).
* ``model`` (not SPEC section 3): every scanned item and the own pair exact (the own pair also
  stays in its list's model when that list is unprobed: one item's expected mass counted twice),
  each unprobed list l by a log-normal model s ~ N(m_l, v_l), m_l = a <q, mu_l>,
  v_l = c_l a^2 q' Sw q (Sw the pooled within-list covariance in rank 64 plus an isotropic rest,
  c_l the list's share of its trace):
  sum e^s ~ n_l e^(m_l + v_l / 2), sum e^s s ~ that times (m_l + v_l). Cost: lists + scanned + 65 + 2.

``--order model`` adds the 65 dots of q' Sw q to the SPEC rows too.

    python -m bench.research_ivf_model_tail --space whitened --probes 16,24,32
    python -m bench.research_ivf_model_tail --space image --probes 16,32 --seed 1

One thread, ~1-2 minutes per run (the data and exact rows are bench/research_pq_head.py's cache).
"""

from __future__ import annotations

import argparse
import json
import math
import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

A = 100.0
HEAD_K = 256
TAIL_M = 2048
VAR_RANK = 64


def lists_of(space: str, X: np.ndarray, T: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    """(assignment of every image, centroids as an IP quantizer holds them)."""
    import faiss

    n, d = X.shape
    rng = np.random.default_rng(0)
    train = rng.choice(n, min(n, 64 * nlist), replace=False)
    if space == "image":
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(X[train])
        quantizer = faiss.downcast_index(index.quantizer)
        centroids = faiss.rev_swig_ptr(quantizer.get_xb(), nlist * d).reshape(nlist, d).copy()
        return quantizer.search(X, 1)[1][:, 0], centroids
    from bench.research_pq_head import query_whitening, whitened_kmeans

    Xw = X @ query_whitening(T)[0]
    assign = whitened_kmeans(Xw, nlist, train).index.search(Xw, 1)[1][:, 0]
    return assign, list_means(X, assign, nlist).astype(np.float32)


def list_means(X: np.ndarray, assign: np.ndarray, nlist: int) -> np.ndarray:
    sums = np.zeros((nlist, X.shape[1]))
    np.add.at(sums, assign, X)
    return sums / np.maximum(np.bincount(assign, minlength=nlist), 1)[:, None]


def run(seed: int, space: str, probes: list[int], nlist: int) -> list[dict]:
    from bench.research_pq_head import prepare
    from queries.score import spearman, top_overlap

    data = prepare(seed)
    X, T, qids = data["image"], data["text"], data["qids"]
    S = data["S"]  # a * <q, x>, exact, queries x n
    n, d = X.shape
    Q = T[qids].astype(np.float64)
    assign, centroids = lists_of(space, X, T, nlist)
    sizes = np.bincount(assign, minlength=nlist)
    mu = list_means(X, assign, nlist)
    resid = X - mu[assign]
    Sw = (resid.T @ resid) / n
    trace = np.zeros(nlist)
    np.add.at(trace, assign, (resid ** 2).sum(1))
    share = trace / np.maximum(sizes, 1) / np.trace(Sw)
    del resid
    w, U = np.linalg.eigh(Sw)
    w, U = w[::-1][:VAR_RANK], U[:, ::-1][:, :VAR_RANK]
    rest = (np.trace(Sw) - w.sum()) / (d - VAR_RANK)
    qv = (((Q @ U) ** 2) @ (w - rest) + rest * (Q ** 2).sum(1)) * A * A  # a^2 q' Sw q
    m_l = A * (Q @ mu.T)
    log_mass = np.log(np.maximum(sizes, 1))[None] + m_l + share[None] * qv[:, None] / 2
    by_centroid = A * (Q @ centroids.T.astype(np.float64))
    mean_s = A * (Q @ X.sum(0, dtype=np.float64)) / n
    R = np.sort(np.random.default_rng([seed, 13]).choice(n, TAIL_M, replace=False))
    logn = math.log(n)
    rows = []
    for P in probes:
        for order_by in ("centroid", "model"):
            order = np.argsort(-(by_centroid if order_by == "centroid" else log_mass), axis=1)[:, :P]
            est = {"spec": [], "specall": [], "model": []}
            scanned = []
            for i in range(len(Q)):
                s = S[i].astype(np.float64)
                e = np.exp(s)
                probed = np.zeros(nlist, bool)
                probed[order[i]] = True
                in_probe = probed[assign]
                cand = np.flatnonzero(in_probe)
                scanned.append(len(cand))

                def kl_klr(z: float, zs: float) -> tuple[float, float]:
                    return zs / z - math.log(z) + logn, math.log(z) - logn - mean_s[i]

                def spec(head: np.ndarray) -> tuple[float, float]:
                    r = R[~head[R]]
                    f = (n - head.sum()) / len(r)
                    return kl_klr(e[head].sum() + f * e[r].sum(), (e[head] * s[head]).sum() + f * (e[r] * s[r]).sum())

                k = min(HEAD_K, len(cand))
                head = np.zeros(n, bool)
                head[cand[np.argpartition(-s[cand], k - 1)[:k]]] = True
                head[qids[i]] = True
                est["spec"].append(spec(head))
                every = in_probe.copy()
                every[qids[i]] = True
                est["specall"].append(spec(every))
                v = share * qv[i]
                z_l = sizes * np.exp(m_l[i] + v / 2)
                est["model"].append(kl_klr(e[every].sum() + z_l[~probed].sum(),
                                           (e[every] * s[every]).sum() + (z_l * (m_l[i] + v))[~probed].sum()))
            for name, values in est.items():
                v = np.array(values)
                dots = nlist + np.mean(scanned) + (TAIL_M + 2 if name != "model" else VAR_RANK + 1 + 2)
                dots += VAR_RANK + 1 if order_by == "model" and name != "model" else 0
                rows.append({
                    "seed": seed, "space": space, "nlist": nlist, "probes": P, "order": order_by, "estimator": name,
                    "dots_per_query": round(float(dots)), "percent_of_n": round(100 * float(dots) / n, 2),
                    "spearman_kl": round(spearman(v[:, 0], data["kl"]), 4), "top25_kl": round(top_overlap(v[:, 0], data["kl"]), 3),
                    "spearman_klr": round(spearman(v[:, 1], data["klr"]), 4), "top25_klr": round(top_overlap(v[:, 1], data["klr"]), 3),
                    "mae_kl": round(float(np.abs(v[:, 0] - data["kl"]).mean()), 3),
                })
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="query seed (1000 random captions)")
    ap.add_argument("--space", default="whitened", choices=["image", "whitened"], help="where the lists are clustered")
    ap.add_argument("--probes", default="16,24,32", help="comma-separated numbers of probed lists")
    ap.add_argument("--nlist", type=int, default=1024, help="IVF lists")
    args = ap.parse_args()
    run(args.seed, args.space, [int(p) for p in args.probes.split(",")], args.nlist)


if __name__ == "__main__":
    main()

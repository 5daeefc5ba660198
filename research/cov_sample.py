"""How much do the covariances from a row subset (build-index --cov-sample) change the scores?

On the calibrated synthetic world (raw embeddings, d = 512), for each modality: the statistics from
every row (exact) and from seeded uniform subsets of 131,072 (the default) and 65,536 rows, exactly as
the builder draws them; then ``loglik`` (SPEC 6, whitening the raw vectors) and ``dw`` with the
modality's own covariance (SPEC 4's quadratic form) for 100,000 random samples, compared with the
exact-covariance values (Spearman, Pearson) and the relative Frobenius error of the covariance.

    python -m research.cov_sample 1000000        # ~3 minutes and ~8 GB on 2 cores
"""

from __future__ import annotations

import json
import sys

import numpy as np

from bench.common import world
from clip_density_index.indexer.stats import StatsAccumulator, cov_row_picker, whitened_loglik


def run(n: int, subsets=(131072, 65536), batch: int = 65536, seed: int = 0) -> list[dict]:
    from scipy.stats import spearmanr

    _, image, text = world(n, "calibrated", normalise=False)
    rows = []
    for name, raw in (("image", image), ("text", text)):
        norms = np.linalg.norm(raw, axis=1).astype(np.float32)
        v = raw / norms[:, None]
        stats = {}
        for sub in (0, *subsets):
            acc = StatsAccumulator(raw.shape[1], raw=True, precision="float32")
            pick = cov_row_picker(n, sub, seed)  # the builder's draw
            for s in range(0, n, batch):
                b = min(batch, n - s)
                acc.update(v[s:s + b], norms[s:s + b], cov_rows=pick(b))
            stats[sub] = acc.finalize()
        q = np.random.default_rng(1).choice(n, min(n, 100_000), replace=False)
        u, vq = raw[q].astype(np.float64), v[q].astype(np.float64)

        def scores(st):
            d = vq - st["mean"]
            return (whitened_loglik(u, st["whiten_mean"], st["whiten"], st["whiten_logdet"]),
                    np.einsum("ij,jk,ik->i", d, st["cov"], d))

        ll0, dw0 = scores(stats[0])
        for sub in subsets:
            ll, dw = scores(stats[sub])
            rows.append({
                "modality": name, "cov_rows": int(stats[sub]["cov_rows"]), "n": n,
                "cov_rel_frobenius_error": float(np.linalg.norm(stats[sub]["cov"] - stats[0]["cov"])
                                                 / np.linalg.norm(stats[0]["cov"])),
                "loglik_spearman": float(spearmanr(ll, ll0)[0]), "loglik_pearson": float(np.corrcoef(ll, ll0)[0, 1]),
                "dw_spearman": float(spearmanr(dw, dw0)[0]),
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)

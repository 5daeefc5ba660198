"""Accuracy and wall time of the stratified estimator (queries/strata.py) against the exact KL.

Text side (queries: captions, candidates: images) of synthetic worlds. Per world and n:

* the plan (k-means lists in the query-aware metric, list-major copy, per-list statistics),
* gamma calibrated on ``--calib`` random captions (exact per-list sums),
* each caption's own image's list always scanned (``own_ids``; ``--no-own`` to turn off),
* ``--queries`` other random captions scored by ``partials`` + ``sql/kl_strata.sql`` and exactly
  by ``queries.exact.exact_kl(..., dtype=torch.float32)`` (same queries, same process, timed back to
  back so that the ratio survives a shared machine),
* Spearman / top-25% overlap / MAE of kl and klr, the fraction of pairs scanned exactly, and the
  time per query of both; ``side_speedup`` extrapolates one whole side (n queries):
  ``n * exact_per_query / (plan + calibration + n * strata_per_query)``.

    python -m bench.strata --n 50000 --geometries calibrated,clustered,flat,heavy
    python -m bench.strata --n 200000 --geometries calibrated,heavy --target 0.98

One JSON line per world on stdout (``--out`` appends them to a file too).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def run_world(geometry: str, n: int, n_queries: int, n_calib: int, target: float, max_fraction: float,
              lists_per_sqrt: float | None, seed: int, fp16: bool, whiten: bool, own: bool = True) -> dict:
    import duckdb
    import torch

    from bench.common import A, world
    from clip_density_index.queries import strata
    from clip_density_index.queries.exact import exact_kl
    from clip_density_index.queries.accuracy import spearman, top_overlap

    if lists_per_sqrt:
        strata.LISTS_PER_SQRT_N = lists_per_sqrt
    _, image, text = world(n, geometry)
    cand = image.astype(np.float16) if fp16 else image
    del image
    rng = np.random.default_rng([seed, 3])
    pick = rng.choice(n, n_queries + n_calib, replace=False)
    qids, cids = np.sort(pick[:n_queries]), pick[n_queries:]
    out = {"geometry": geometry, "n": n, "queries": n_queries, "calib": n_calib, "target": target,
           "max_fraction": max_fraction, "fp16": fp16, "whiten": whiten, "own": own, "seed": seed}
    t0 = time.perf_counter()
    plan = strata.build_plan(cand, seed=seed, queries=text if whiten else None)
    out["plan_s"] = time.perf_counter() - t0
    out["lists"] = plan.n_lists
    t0 = time.perf_counter()
    gamma = strata.calibrate(plan, text[cids], A, target=target, max_fraction=max_fraction,
                             own_ids=cids if own else None)
    out["calib_s"] = time.perf_counter() - t0
    out["gamma"] = gamma
    q = text[qids]
    con = duckdb.connect()
    t0 = time.perf_counter()
    table = strata.partials(plan, q, A, gamma=gamma, target=target, max_fraction=max_fraction,
                            query_ids=qids, own_ids=qids if own else None)
    res = strata.strata_kl(con, table, n)
    out["strata_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    kl, klr = exact_kl(q, cand, A, dtype=torch.float32, device="cpu")
    out["exact_s"] = time.perf_counter() - t0
    ekl, eklr = res.column("kl").to_numpy(), res.column("klr").to_numpy()
    share = res.column("model_share").to_numpy()
    out.update({
        "scanned": strata.scanned_fraction(table, n),
        "spearman_kl": spearman(ekl, kl), "top25_kl": top_overlap(ekl, kl),
        "spearman_klr": spearman(eklr, klr), "top25_klr": top_overlap(eklr, klr),
        "mae_kl": float(np.abs(ekl - kl).mean()), "mae_klr": float(np.abs(eklr - klr).mean()),
        "model_share_median": float(np.median(share)), "model_share_p99": float(np.quantile(share, 0.99)),
        "strata_ms_per_query": 1e3 * out["strata_s"] / n_queries,
        "exact_ms_per_query": 1e3 * out["exact_s"] / n_queries,
    })
    out["query_speedup"] = out["exact_s"] / out["strata_s"]
    out["side_speedup"] = n * out["exact_s"] / n_queries / (
        out["plan_s"] + out["calib_s"] + n * out["strata_s"] / n_queries)
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--geometries", default="calibrated,clustered,flat")
    ap.add_argument("--queries", type=int, default=4000, help="checked captions (random, seeded)")
    ap.add_argument("--calib", type=int, default=512, help="calibration captions (disjoint)")
    ap.add_argument("--target", type=float, default=None, help="default: the module's DEFAULT_TARGET")
    ap.add_argument("--max-fraction", type=float, default=0.5)
    ap.add_argument("--lists-per-sqrt", type=float, default=None, help="L / sqrt(N) (default: the module's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp16", action="store_true", help="candidates stored as float16 (as the pool stores them)")
    ap.add_argument("--no-whiten", action="store_true", help="cluster in the image space, not the query-aware one")
    ap.add_argument("--no-own", action="store_true", help="do not force each caption's own image's list")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = ap.parse_args()
    from clip_density_index.queries import strata

    target = strata.DEFAULT_TARGET if args.target is None else args.target
    for g in args.geometries.split(","):
        row = run_world(g, args.n, args.queries, args.calib, target, args.max_fraction,
                        args.lists_per_sqrt, args.seed, args.fp16, not args.no_whiten, not args.no_own)
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()

"""Accuracy vs cost of the KL estimators.

For one synthetic world (n, geometry; every world of ``bench.common.WORLDS``, the heavy-tailed ones
included, belongs in each accuracy table) and one side (``text``: queries are captions, candidates the
images; SPEC 11 ``kl_text`` / ``klr_text``), on the same Q random queries:

* truth: ``queries.exact.exact_kl`` (float64, all n candidates);
* MIMPS (SPEC 3, this project's estimator) for every (FAISS index, nprobe, k, m): the head is the real
  ``queries.estimate.search_neighbours`` (own pair always in K, as ``score`` does), the tail R is the
  real ``queries.estimate.draw_tail``; the estimator is combined in numpy from per-query sums (same
  formulas as ``sql/kl_per_sample.sql``; checked against the real ``estimate_kl`` on the default
  configuration, ``check_max_abs_diff`` in the results);
* the paper's estimator: ``queries.exact.sampled_softmax_kl`` over a grid of sample sizes M, and at
  exactly the default configuration's cost;
* an "oracle head": the true top-k (Flat search), plotted at cost k + m (what a perfect, free MIPS
  would give: the accuracy ceiling of the estimator family, not an achievable cost).

Cost = dot products per query (``queries.estimate.dots_per_query``: FAISS search + m + 1 + 1).
Wall time per config = measured FAISS search + measured ``tail_sums``, per query (2 CPU threads).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from bench.common import WORLDS, A, log, save_json, world

KS = (16, 64, 256, 1024)
MS = (0, 1024, 2048, 4096, 16384)


def plan(n: int, quick: bool = False) -> dict:
    """Index settings swept for a pool of n: {key: [nprobe, ...]} (Flat: [0])."""
    from clip_density_index.indexer.choose import default_nlist

    nl = default_nlist(n)
    if quick:
        return {f"IVF{nl},Flat": [2, 8, 32], "Flat": [0]}
    lists = sorted({max(16, nl // 4), nl})
    out = {}
    for L in lists:
        probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if p <= L // 4]
        out[f"IVF{L},Flat"] = probes[-8:] if L >= 1024 else probes[-6:]
    out["Flat"] = [0]
    return out


def _stats(approx, exact):
    from clip_density_index.queries.accuracy import spearman, top_overlap

    err = np.abs(approx - exact)
    return {"spearman": spearman(approx, exact), "mae": float(err.mean()), "max_err": float(err.max()),
            "top25": top_overlap(approx, exact)}


def _combine(head_ids, head_s, tail_ids, tail_e_sum, tail_es_sum, m, mean_s, n):
    """The MIMPS estimate (SPEC 3) from the head and the whole-R sums; float64, no shift needed
    (|s| <= a = 100, e^100 fits in float64)."""
    valid = head_ids >= 0
    eh = np.where(valid, np.exp(np.where(valid, head_s, 0.0)), 0.0)
    k_q = valid.sum(1)
    zh, sh = eh.sum(1), (eh * np.where(valid, head_s, 0.0)).sum(1)
    if m:
        pos = np.searchsorted(tail_ids, np.where(valid, head_ids, 0))
        inr = valid & (tail_ids[np.minimum(pos, m - 1)] == head_ids)
        ov_m = inr.sum(1)
        rest = np.maximum(tail_e_sum - (eh * inr).sum(1), 0.0)
        rest_s = tail_es_sum - (eh * inr * np.where(valid, head_s, 0.0)).sum(1)
        r = m - ov_m
        w = np.where(r > 0, (n - k_q) / np.maximum(r, 1), 0.0)
    else:
        rest = rest_s = w = 0.0
    z = zh + w * rest
    e_s = (sh + w * rest_s) / z
    log_z = np.log(z)
    return e_s - log_z + math.log(n), log_z - math.log(n) - mean_s


def run(n: int, geometry: str, out: Path, *, q: int = 1000, quick: bool = False, seed: int = 0,
        side: str = "text") -> dict:
    import torch

    from clip_density_index.indexer import choose, faiss_index
    from clip_density_index.queries import estimate
    from clip_density_index.queries.exact import exact_kl, sampled_softmax_kl

    if geometry not in WORLDS:
        raise ValueError(f"unknown synthetic world {geometry!r}; choose one of {', '.join(WORLDS)}")
    t_all = time.perf_counter()
    log(f"accuracy n={n} geometry={geometry} side={side}: generating")
    _, image, text = world(n, geometry)
    queries_all, cands = (text, image) if side == "text" else (image, text)
    del _
    rng = np.random.default_rng([seed, 5])
    qids = np.sort(rng.choice(n, size=min(q, n), replace=False)).astype(np.int64)
    queries = np.ascontiguousarray(queries_all[qids])
    Q = len(qids)
    res = {"n": n, "geometry": geometry, "side": side, "q": Q, "a": A, "threads": torch.get_num_threads(),
           "configs": [], "paper": [], "indexes": {}}

    log("  exact")
    t0 = time.perf_counter()
    kl_x, klr_x = exact_kl(queries, cands, A, device="cpu")
    res["exact"] = {"seconds_per_query": (time.perf_counter() - t0) / Q, "dots_per_query": n,
                    "kl_mean": float(kl_x.mean()), "kl_sd": float(kl_x.std()),
                    "klr_mean": float(klr_x.mean()), "klr_sd": float(klr_x.std())}
    cand_sum = estimate.candidate_sum(cands)
    mean_s = A * (queries.astype(np.float64) @ cand_sum) / n

    # paper's estimator over a grid of M
    grid = [M for M in (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)
            if M <= n // 2]
    if quick:
        grid = grid[::2]
    for M in grid:
        t0 = time.perf_counter()
        kl_p, klr_p = sampled_softmax_kl(queries, cands, A, M, seed=seed, device="cpu")
        dt = (time.perf_counter() - t0) / Q
        res["paper"].append({"M": M, "dots_per_query": M, "seconds_per_query": dt,
                             "kl": _stats(kl_p, kl_x), "klr": _stats(klr_p, klr_x)})
    log(f"  paper grid done ({len(grid)} sizes)")

    # tail sums per m (real tail_sums for the timing; the per-query whole-R sums, float64, for the combine)
    tails = {}
    for m in MS:
        if m > n:
            continue
        tail_ids = estimate.draw_tail(n, m, seed)
        t0 = time.perf_counter()
        estimate.tail_sums(queries, cands, tail_ids, A, np.full(Q, -np.inf), cand_sum=cand_sum, device="cpu")
        t_tail = time.perf_counter() - t0
        if m:
            s = A * (queries.astype(np.float64) @ cands[tail_ids].astype(np.float64).T)
            e = np.exp(s)
            tails[m] = (tail_ids, e.sum(1), (e * s).sum(1), t_tail)
        else:
            tails[m] = (tail_ids, np.zeros(Q), np.zeros(Q), 0.0)

    kmax = max(KS)
    for key, probes in plan(n, quick).items():
        log(f"  index {key}")
        t0 = time.perf_counter()
        index = faiss_index.build_index(key, cands, seed=seed)
        res["indexes"][key] = {"build_seconds": time.perf_counter() - t0}
        for nprobe in probes:
            if key == "Flat":
                search_dots = float(n)
            else:
                search_dots = choose.dots_per_query(key, n, nprobe)
            for k in KS:
                if k > n:
                    continue
                t0 = time.perf_counter()
                nb = estimate.search_neighbours(index, queries, cands, k, A, nprobe=nprobe or None, own_ids=qids)
                t_search = time.perf_counter() - t0
                found = (nb.ids >= 0).sum(1)
                for m, (tail_ids, te, tes, t_tail) in tails.items():
                    kl_e, klr_e = _combine(nb.ids, nb.scores, tail_ids, te, tes, m, mean_s, n)
                    dots = estimate.dots_per_query(search_dots, k, m, nb.rescored, own_pair=True)
                    res["configs"].append({
                        "key": key, "nprobe": nprobe, "k": k, "m": m, "dots_per_query": dots,
                        "oracle": key == "Flat", "oracle_dots": k + m + 2,
                        "seconds_per_query": (t_search + t_tail) / Q,
                        "search_seconds_per_query": t_search / Q, "found_mean": float(found.mean()),
                        "kl": _stats(kl_e, kl_x), "klr": _stats(klr_e, klr_x)})
        # the real estimator, end to end (search + table + tail + SQL), on the default configuration
        if key == choose.choose_index_key(n, cands.shape[1], choose.parse_memory("8G")):
            from clip_density_index.queries.score_params import DEFAULT_K, DEFAULT_TAIL

            k, m = min(DEFAULT_K, n), min(DEFAULT_TAIL, n)
            nprobe = choose.default_nprobe(key, n) or None
            tail_ids = estimate.draw_tail(n, m, seed)
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            tab = estimate.estimate_kl(index, queries, cands, k, A, tail_ids=tail_ids, nprobe=nprobe,
                                       own_ids=qids, cand_sum=cand_sum, device="cpu", timings=timings)
            wall = time.perf_counter() - t0
            kl_r, klr_r = tab.column("kl").to_numpy(), tab.column("klr").to_numpy()
            search_dots = float(n) if key == "Flat" else choose.dots_per_query(key, n, nprobe)
            dots = estimate.dots_per_query(search_dots, k, m, False, own_pair=True)
            nb = estimate.search_neighbours(index, queries, cands, k, A, nprobe=nprobe, own_ids=qids)
            kl_c, klr_c = _combine(nb.ids, nb.scores, tail_ids, *tails[m][1:3], m, mean_s, n) if m in tails \
                else (kl_r, klr_r)
            M = int(round(min(dots, n)))
            t1 = time.perf_counter()
            kl_p, klr_p = sampled_softmax_kl(queries, cands, A, M, seed=seed, device="cpu")
            t_p = time.perf_counter() - t1
            res["default"] = {
                "key": key, "nprobe": nprobe, "k": k, "m": m, "dots_per_query": dots,
                "dots_fraction": dots / n, "seconds_per_query": wall / Q,
                "phase_seconds_per_query": {p: v / Q for p, v in timings.items()},
                "kl": _stats(kl_r, kl_x), "klr": _stats(klr_r, klr_x),
                "check_max_abs_diff": float(max(np.abs(kl_c - kl_r).max(), np.abs(klr_c - klr_r).max())),
                "paper_at_same_cost": {"M": M, "seconds_per_query": t_p / Q,
                                       "kl": _stats(kl_p, kl_x), "klr": _stats(klr_p, klr_x)},
            }
            log(f"  default {key} nprobe={nprobe} k={k} m={m}: {res['default']['kl']} / paper "
                f"{res['default']['paper_at_same_cost']['kl']} (check diff {res['default']['check_max_abs_diff']:.2e})")
        del index
    res["seconds"] = time.perf_counter() - t_all
    name = f"accuracy-{geometry}-{n}-{side}"
    save_json(res, out / f"{name}.json")
    log(f"  saved {name} ({res['seconds']:.0f}s)")
    return res


def frontier(configs: list[dict], metric: str = "both") -> list[dict]:
    """Pareto frontier (achievable configs only): best accuracy at each cost, by min of the kl / klr
    Spearman (``metric="both"``) or one of them."""
    def acc(c):
        return min(c["kl"]["spearman"], c["klr"]["spearman"]) if metric == "both" else c[metric]["spearman"]

    pts = sorted((c for c in configs if not c["oracle"]), key=lambda c: (c["dots_per_query"], -acc(c)))
    out, best = [], -1.0
    for c in pts:
        if acc(c) > best:
            out.append(c)
            best = acc(c)
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = res["n"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), sharey=True)
    colors = {16: "tab:blue", 64: "tab:green", 256: "tab:orange", 1024: "tab:purple"}
    for ax, metric in zip(axes, ("kl", "klr")):
        cf = [c for c in res["configs"] if not c["oracle"]]
        for k, col in colors.items():
            pts = [c for c in cf if c["k"] == k]
            ax.scatter([c["dots_per_query"] for c in pts], [max(1 - c[metric]["spearman"], 1e-5) for c in pts],
                       s=9, color=col, alpha=0.45, label=f"top-k + tail, k={k}")
        fr = frontier(res["configs"], metric)
        ax.plot([c["dots_per_query"] for c in fr], [max(1 - c[metric]["spearman"], 1e-5) for c in fr],
                color="black", lw=1.5, label="top-k + tail: best at each cost")
        orc = [c for c in res["configs"] if c["oracle"]]
        fo = frontier([{**c, "oracle": False, "dots_per_query": c["oracle_dots"]} for c in orc], metric)
        ax.plot([c["dots_per_query"] for c in fo], [max(1 - c[metric]["spearman"], 1e-5) for c in fo],
                color="gray", ls=":", lw=1.5, label="oracle head (true top-k, cost k+m; not achievable)")
        pp = res["paper"]
        ax.plot([p["M"] for p in pp], [max(1 - p[metric]["spearman"], 1e-5) for p in pp], "s-", color="tab:red",
                ms=4, lw=1.5, label="paper: softmax over uniform sample of M")
        if "default" in res:
            d = res["default"]
            ax.scatter([d["dots_per_query"]], [max(1 - d[metric]["spearman"], 1e-5)], marker="*", s=160,
                       color="gold", edgecolor="black", zorder=5, label=f"score defaults (k={d['k']}, m={d['m']})")
        ax.axhline(1e-3, color="tab:red", lw=0.7, ls="--")
        ax.axvline(0.05 * n, color="gray", lw=0.7, ls="--")
        ax.text(0.05 * n, 0.5, " 5% of n", fontsize=7, color="gray", va="top")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("dot products per query")
        ax.set_title(f"{metric}_{res['side']}")
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_ylabel("1 - Spearman vs exact (log; dashed = 0.999)")
    axes[1].legend(fontsize=6.5, loc="lower left")
    fig.suptitle(f"Accuracy vs cost: synthetic {res['geometry']} world, n={n:,}, {res['q']} random queries",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

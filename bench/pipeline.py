"""Throughput, scaling and latency: the real CLI, end to end, in child processes.

For each n (calibrated synthetic world, d = 512):

1. the world's raw embeddings are written as a clip-retrieval folder (``img_emb/``, ``text_emb/``,
   ``metadata/``): "precomputed embeddings";
2. ``cli.py build-index --source clip-retrieval`` with the automatic index choice (IVF) and with
   ``--index-factory Flat``: wall time, samples/s, peak RSS of the child (``ru_maxrss``);
3. ``cli.py score IDX --json`` (all columns, both sides, default k / m): wall time, samples/s, peak RSS;
4. exact KL (``queries.exact.exact_kl``, float64, the code path of ``score --exact``) on a random
   subset of queries per side against all n candidates, extrapolated linearly to n queries (its cost is
   exactly linear in the number of queries); at the smallest n also the real ``score --exact`` end to
   end, to check the extrapolation;
5. at the largest n: latency of ``sample --mode top``, ``weights`` and the named query ``top_by_score``
   after the index is loaded (Python API in one child; prompt encoding timed separately).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, log, run_child, save_json, world

PY = sys.executable


def write_clip_retrieval(n: int, folder: Path) -> None:
    import pyarrow.parquet as pq

    if (folder / "done").exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True)
    meta, image, text = world(n, "calibrated", normalise=False)
    np.save(folder / "img_emb" / "img_emb_0.npy", image)
    np.save(folder / "text_emb" / "text_emb_0.npy", text)
    pq.write_table(meta, folder / "metadata" / "metadata_0.parquet")
    (folder / "done").write_text(str(n))


def _exact_child(index_dir: str, q: int, seed: int = 0) -> None:
    """Child: exact KL of q random queries per side against all candidates; prints JSON."""
    from clip_density_index.indexer.pool import open_index
    from clip_density_index.queries.exact import exact_kl

    pool = open_index(index_dir)
    ids = np.sort(np.random.default_rng(seed).choice(pool.n, size=min(q, pool.n), replace=False))
    out = {}
    for side, other in (("text", "image"), ("image", "text")):
        queries = np.asarray(pool.embeddings(side)[ids])
        cands = pool.embeddings(other)
        t0 = time.perf_counter()
        exact_kl(queries, cands, pool.logit_scale, device="cpu")
        out[side] = time.perf_counter() - t0
    print(json.dumps({"q": len(ids), "seconds": out}))


def _latency_child(index_dir: str, reps: int) -> None:
    """Child: latencies of the read side after the index is loaded; prints JSON."""
    from clip_density_index.indexer.pool import open_index
    from clip_density_index.indexer.synthetic import VOCABULARY, SyntheticWorld
    from clip_density_index.queries import sqlrun
    from clip_density_index.queries import weighting as weights

    t0 = time.perf_counter()
    pool = open_index(index_dir)
    pool.faiss("image")
    pool.embeddings("image")
    pool.reader()  # the catalog connection that sample keeps open
    load = time.perf_counter() - t0
    words = [w for _, (_, _, ws) in VOCABULARY.items() for w in ws]
    prompts = [f"a photo of a {w}" for w in words][:max(reps, 10)]
    enc, vecs = [], []
    sw = SyntheticWorld(seed=0, dim=pool.dim)  # the pool is precomputed embeddings: no model in the index
    for p in prompts:
        t = time.perf_counter()
        try:
            v = sw.encode_prompt(p)
        except Exception:
            continue
        enc.append(time.perf_counter() - t)
        vecs.append((p, v))
    vecs = vecs[:reps]

    def timed(f, items):
        out = []
        for it in items:
            t = time.perf_counter()
            f(it)
            out.append(time.perf_counter() - t)
        return out

    first = timed(lambda pv: weights.sample(pool, pv[0], pv[1], n=100, mode="top"), vecs[:1])
    got: dict[str, list] = {"default": [], "fast": [], "exact": []}
    nlist = ((pool.manifest.get("index_params") or {}).get("image") or {}).get("nlist")
    fast_probe = max(1, int(nlist) // 16) if nlist else None

    def run(label, **kw):
        return lambda pv: got[label].append(weights.sample(pool, pv[0], pv[1], n=100, mode="top", **kw))

    top = timed(run("default"), vecs)  # a quarter of the IVF lists (weights.default_top_nprobe)
    top_fast = timed(run("fast", nprobe=fast_probe), vecs)  # sample --nprobe nlist/16
    top_exact = timed(run("exact", exact=True), vecs)  # sample --exact: every list

    def recall(label):
        r = [len(set(a.column("vec_id").to_pylist()) & set(b.column("vec_id").to_pylist())) / 100
             for a, b in zip(got[label], got["exact"])]
        return sum(r) / max(len(r), 1), min(r, default=0.0)

    recall_default, recall_default_min = recall("default")
    recall_fast, _ = recall("fast")
    draw = timed(lambda pv: weights.sample(pool, pv[0], pv[1], n=100, mode="draw"), vecs[: max(5, reps // 5)])
    comp = timed(lambda pv: weights.compute_weights(pool, pv[0], pv[1]), vecs[: max(5, reps // 5)])
    # the whole `weights` call: compute + store the n rows in the catalog
    store = timed(lambda pv: weights.weights(pool, pv[0], pv[1]), vecs[: max(3, reps // 10)])
    pool.close()
    named = {}
    for name, params in (("top_by_score", {"column": "kl_text", "limit": 20}),
                         ("bottom_by_score", {"column": "kl_text", "limit": 20}),
                         ("score_deciles", {}), ("score_correlations", {})):
        try:
            sqlrun.get_query(name)
        except Exception:
            continue
        try:
            named[name] = timed(lambda _: sqlrun.run_query(pool, name, **params), range(max(5, min(20, reps // 2))))
        except Exception as e:  # a query whose parameters differ: report, do not fail the run
            named[name] = {"error": str(e)[:200]}
    print(json.dumps({"load_seconds": load, "encode_prompt": enc, "sample_top_first": first,
                      "sample_top": top, "default_nprobe": weights.default_top_nprobe(nlist),
                      "default_recall_mean": recall_default, "default_recall_min": recall_default_min,
                      "sample_top_fast": top_fast, "fast_nprobe": fast_probe, "fast_recall_mean": recall_fast,
                      "sample_top_exact": top_exact, "sample_draw": draw, "compute_weights": comp,
                      "store_weights": store, "named": named, "n": pool.n}))


def percentiles(xs) -> dict:
    xs = np.asarray(xs, float)
    return {"p50_ms": float(np.percentile(xs, 50) * 1e3), "p99_ms": float(np.percentile(xs, 99) * 1e3),
            "mean_ms": float(xs.mean() * 1e3), "count": int(len(xs))}


def run(ns: list[int], out: Path, *, exact_q: int = 1000, latency_reps: int = 100, latency: bool = True,
        validate_n: int | None = 20000, keep: bool = False) -> dict:
    data = out / "data"
    logf = out / "pipeline.log"
    res = {"ns": ns, "runs": []}
    path = out / "pipeline.json"
    if validate_n:
        # exact extrapolation check: real `score --exact` (KL columns only) vs the subset method
        folder = data / f"cr-{validate_n}"
        write_clip_retrieval(validate_n, folder)
        idx = out / f"idx-{validate_n}"
        b = run_child([PY, "cli.py", "build-index", "--source", "clip-retrieval", "--input", folder, "--out", idx,
                       "--uid-column", "uid", "--quiet"], logf)
        full = run_child([PY, "cli.py", "score", idx, "--exact", "--metrics", "kl,klr", "--json", "--quiet",
                          "--device", "cpu"], logf, stdout=out / "stdout.txt")
        approx = run_child([PY, "cli.py", "score", idx, "--metrics", "kl,klr", "--json", "--quiet",
                            "--device", "cpu"], logf, stdout=out / "stdout.txt")
        sub = run_child([PY, "-m", "bench.pipeline", "exact", idx, str(min(exact_q, validate_n // 10))], logf,
                        stdout=out / "stdout.txt")
        s = json.loads(sub["stdout"])
        extrap = sum(s["seconds"].values()) * validate_n / s["q"]
        res["exact_validation"] = {"n": validate_n, "build_rc": b["rc"], "score_exact_seconds": full["seconds"],
                                   "score_approx_kl_seconds": approx["seconds"], "subset_q": s["q"],
                                   "extrapolated_exact_kl_seconds": extrap,
                                   "exact_report": _report(full), "approx_report": _report(approx)}
        save_json(res, path)
        log(f"exact validation n={validate_n}: score --exact {full['seconds']:.1f}s vs extrapolated {extrap:.1f}s")
        if not keep:
            shutil.rmtree(idx, ignore_errors=True)
    for n in ns:
        folder = data / f"cr-{n}"
        log(f"pipeline n={n}: writing precomputed embeddings")
        t0 = time.perf_counter()
        write_clip_retrieval(n, folder)
        emb_bytes = 2 * n * 512 * 4
        r = {"n": n, "embeddings_bytes": emb_bytes, "write_seconds": time.perf_counter() - t0}
        for label, extra in (("flat", ["--index-factory", "Flat"]), ("auto", [])):
            idx = out / f"idx-{n}-{label}"
            shutil.rmtree(idx, ignore_errors=True)
            log(f"  build-index {label}")
            b = run_child([PY, "cli.py", "build-index", "--source", "clip-retrieval", "--input", folder, "--out",
                           idx, "--uid-column", "uid", "--quiet", *extra], logf, stdout=out / "stdout.txt")
            b["samples_per_s"] = n / b["seconds"]
            b["peak_over_embeddings"] = b["peak_rss_bytes"] / emb_bytes
            b["stdout"] = b.get("stdout", "")[-800:]
            r[f"build_{label}"] = b
            log(f"    {b['seconds']:.1f}s, {b['samples_per_s']:,.0f} samples/s, peak {b['peak_rss_bytes'] / 2**30:.2f} GiB"
                f" (rc {b['rc']})")
            if label == "flat" and not keep:
                shutil.rmtree(idx, ignore_errors=True)
            save_json(res | {"runs": res["runs"] + [r]}, path)
        idx = out / f"idx-{n}-auto"
        log("  score (all columns, both sides, defaults)")
        sc = run_child([PY, "cli.py", "score", idx, "--json", "--quiet", "--device", "cpu"], logf,
                       stdout=out / "stdout.txt")
        sc["samples_per_s"] = n / sc["seconds"]
        sc["report"] = _report(sc)
        sc.pop("stdout", None)
        r["score"] = sc
        log(f"    {sc['seconds']:.1f}s, {sc['samples_per_s']:,.0f} samples/s, peak {sc['peak_rss_bytes'] / 2**30:.2f} GiB")
        q = min(exact_q, n)
        log(f"  exact KL on {q} queries per side")
        ex = run_child([PY, "-m", "bench.pipeline", "exact", idx, str(q)], logf, stdout=out / "stdout.txt")
        s = json.loads(ex["stdout"])
        kl_secs = approx_kl_seconds(sc["report"])
        r["exact"] = {"q": s["q"], "seconds": s["seconds"],
                      "extrapolated_seconds": sum(s["seconds"].values()) * n / s["q"],
                      "approx_kl_seconds": kl_secs,
                      "approx_total_seconds": sc["seconds"]}
        r["exact"]["ratio_vs_approx_kl"] = r["exact"]["extrapolated_seconds"] / max(kl_secs, 1e-9)
        r["exact"]["ratio_vs_approx_total"] = r["exact"]["extrapolated_seconds"] / sc["seconds"]
        log(f"    exact extrapolated {r['exact']['extrapolated_seconds']:.0f}s; "
            f"ratio {r['exact']['ratio_vs_approx_kl']:.1f}x (KL phases) / {r['exact']['ratio_vs_approx_total']:.1f}x (all)")
        res["runs"].append(r)
        save_json(res, path)
        if latency and n == max(ns):
            log(f"  latency at n={n}")
            lat = run_child([PY, "-m", "bench.pipeline", "latency", idx, str(latency_reps)], logf,
                            stdout=out / "stdout.txt")
            try:
                L = json.loads(lat["stdout"].strip().splitlines()[-1])
            except Exception:
                L = {"error": lat.get("stdout", "")[-500:], "rc": lat["rc"]}
            summary = {"n": n, "raw": L}
            if "sample_top" in L:
                summary.update({
                    "load_seconds": L["load_seconds"], "encode_prompt": percentiles(L["encode_prompt"]),
                    "sample_top": percentiles(L["sample_top"]), "sample_top_first_ms": L["sample_top_first"][0] * 1e3,
                    "sample_draw": percentiles(L["sample_draw"]), "compute_weights": percentiles(L["compute_weights"]),
                    "named": {k: percentiles(v) for k, v in L["named"].items() if isinstance(v, list)}})
            res["latency"] = summary
            save_json(res, path)
            log(f"    latency: {json.dumps({k: v for k, v in summary.items() if k != 'raw'})[:600]}")
        if not keep and n != max(ns):
            shutil.rmtree(idx, ignore_errors=True)
    return res


def approx_kl_seconds(report: dict | None) -> float:
    """Seconds of the KL columns in a score report: the per-side totals ``kl_text`` / ``kl_image``
    (their sub-phases ``kl_text.search`` etc. are parts of them)."""
    return sum(v for k, v in (report or {}).get("seconds", {}).items() if k.startswith("kl_") and "." not in k)


def _report(child: dict) -> dict | None:
    try:
        txt = child.get("stdout", "")
        return json.loads(txt[txt.index("{"):])
    except Exception:
        return None


def fit_exponent(ns, ys) -> float:
    """Slope of log y against log n (least squares): y ~ n^slope."""
    return float(np.polyfit(np.log(np.asarray(ns, float)), np.log(np.asarray(ys, float)), 1)[0])


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in res["runs"] if "score" in r]
    if len(runs) < 2:
        return
    ns = [r["n"] for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = {
        "build-index (auto IVF)": [r["build_auto"]["seconds"] for r in runs],
        "build-index (Flat)": [r["build_flat"]["seconds"] for r in runs],
        "score (all columns, both sides)": [r["score"]["seconds"] for r in runs],
        "exact KL, both sides (extrapolated)": [r["exact"]["extrapolated_seconds"] for r in runs],
    }
    for (label, ys), st in zip(series.items(), ("o-", "s-", "^-", "x--")):
        axes[0].plot(ns, ys, st, label=f"{label}: n^{fit_exponent(ns, ys):.2f}")
    axes[0].set_xscale("log"), axes[0].set_yscale("log")
    axes[0].set_xlabel("pool size n"), axes[0].set_ylabel("wall seconds")
    axes[0].set_title("time vs n")
    mem = {
        "build-index (auto IVF)": [r["build_auto"]["peak_rss_bytes"] / 2**30 for r in runs],
        "build-index (Flat)": [r["build_flat"]["peak_rss_bytes"] / 2**30 for r in runs],
        "score": [r["score"]["peak_rss_bytes"] / 2**30 for r in runs],
        "embeddings (image + text, float32)": [r["embeddings_bytes"] / 2**30 for r in runs],
    }
    for (label, ys), st in zip(mem.items(), ("o-", "s-", "^-", "k:")):
        axes[1].plot(ns, ys, st, label=f"{label}: n^{fit_exponent(ns, ys):.2f}")
    axes[1].set_xscale("log"), axes[1].set_yscale("log")
    axes[1].set_xlabel("pool size n"), axes[1].set_ylabel("peak RSS, GiB")
    axes[1].set_title("peak memory vs n")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7)
    fig.suptitle("Scaling (synthetic calibrated world, d=512, CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1] == "exact":
        _exact_child(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "latency":
        _latency_child(sys.argv[2], int(sys.argv[3]))

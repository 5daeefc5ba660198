"""Run the benchmarks of BENCHMARKS.md (sections 2 and 4) and write results, plots and a markdown
fragment under --out.

    python bench/run.py                 # everything (~1.5-2 h on 2 CPU cores, BENCHMARKS.md)
    python bench/run.py --quick         # a minutes-long subset
    python bench/run.py --sections accuracy --accuracy-n 100000 --geometries calibrated

Sections: accuracy (accuracy against cost), pipeline (throughput, scaling, latency; aliases
throughput, scaling, latency), encode (open_clip encoding throughput with a tiny random model).
Results: ``OUT/*.json``; plots: ``OUT/*.png``; summary: ``OUT/results.md`` (``python -m bench.report
OUT`` regenerates it from the JSON files).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import accuracy, encode, pipeline, report  # noqa: E402
from bench.common import WORLDS, command_line, log, machine, save_json  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small pools, fewer settings: a few minutes")
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    ap.add_argument("--sections", default="accuracy,pipeline,encode",
                    help="comma list of accuracy, pipeline (= throughput, scaling, latency), encode")
    ap.add_argument("--accuracy-n", default=None, help="comma list of pool sizes for the accuracy sweep")
    ap.add_argument("--geometries", default=",".join(WORLDS), help="comma list of synthetic worlds (default: all)")
    ap.add_argument("--queries", type=int, default=None, help="random queries compared with exact")
    ap.add_argument("--scaling-n", default=None, help="comma list of pool sizes for build/score scaling")
    args = ap.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    sections = {s.strip() for s in args.sections.split(",")}
    if sections & {"throughput", "scaling", "latency"}:
        sections.add("pipeline")
    meta = {"machine": machine(), "command": command_line(), "quick": args.quick}
    save_json(meta, out / "run.json")
    log(f"bench: {meta}")
    geoms = [g.strip() for g in args.geometries.split(",") if g.strip()]
    if args.quick:
        acc_plan = [(20000, g) for g in geoms]
        q = args.queries or 300
    else:
        ns = [int(x) for x in args.accuracy_n.split(",")] if args.accuracy_n else None
        if ns:
            acc_plan = [(n, g) for n in ns for g in geoms]
        else:  # priorities: 100k on every geometry, then (after the pipeline) 10k and 1M
            acc_plan = [(100_000, g) for g in geoms]
        q = args.queries or 1000
    late_plan = [] if (args.quick or args.accuracy_n) else [(10_000, g) for g in geoms] + [(1_000_000, "calibrated")]

    def do_accuracy(plan_):
        for n, g in plan_:
            res = accuracy.run(n, g, out, q=q, quick=args.quick)
            accuracy.plot(res, out / f"accuracy-{g}-{n}-text.png")
            report.write(out)

    if "accuracy" in sections:
        do_accuracy(acc_plan)
    if "pipeline" in sections:
        if args.scaling_n:
            ns = [int(x) for x in args.scaling_n.split(",")]
        else:
            ns = [10_000, 30_000] if args.quick else [100_000, 300_000, 1_000_000]
        res = pipeline.run(ns, out, exact_q=200 if args.quick else 1000, latency_reps=20 if args.quick else 100,
                           validate_n=5000 if args.quick else 20000)
        pipeline.plot(res, out / "scaling.png")
        report.write(out)
    if "encode" in sections:
        try:
            encode.run(out, n=500 if args.quick else 2000)
        except ImportError as e:
            log(f"encode: skipped ({e})")
    if "accuracy" in sections and late_plan:
        do_accuracy(late_plan)
    report.write(out)
    log("bench: done")


if __name__ == "__main__":
    main()

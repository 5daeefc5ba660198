"""Time the exact method (``queries.exact.exact_kl``) with different score-block sizes.

The same random queries per side of the calibrated synthetic world against all n candidates, each
block size in turn, ``--rounds`` times, with the largest difference from the first block size's
results (they should agree to ~1e-13). One JSON line per (round, block size).

    python -m bench.exact_blocks --n 1000000 --blocks 1024x16384,512x4096 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    from bench.common import world
    from queries.exact import exact_kl

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="pool size")
    ap.add_argument("--queries", type=int, default=1000, help="random queries per side")
    ap.add_argument("--blocks", default="1024x16384,512x4096", help="comma-separated QUERIESxCANDIDATES")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    blocks = [tuple(int(v) for v in b.split("x")) for b in args.blocks.split(",")]
    _, image, text = world(args.n, "calibrated")
    ids = np.sort(np.random.default_rng(0).choice(args.n, size=min(args.queries, args.n), replace=False))
    first = {}
    for r in range(args.rounds):
        for cq, cn in blocks:
            row = {"round": r, "block": f"{cq}x{cn}"}
            for side, q, c in (("text", text, image), ("image", image, text)):
                t0 = time.perf_counter()
                kl, _ = exact_kl(q[ids], c, 100.0, device="cpu", chunk_q=cq, chunk_n=cn)
                row[f"{side}_s"] = round(time.perf_counter() - t0, 2)
                first.setdefault(side, kl)
                row[f"{side}_max_diff"] = float(np.abs(kl - first[side]).max())
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

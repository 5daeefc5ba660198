"""Time the exact method (``queries.exact.exact_kl``) with different score-block sizes.

The same random queries per side of the calibrated synthetic world against all n candidates, each
block size in turn, ``--rounds`` times, with the largest difference from the first block size's
results (they should agree to ~1e-13). One JSON line per (round, block size).

    python -m research.exact_blocks --n 1000000 --blocks 1024x16384,512x4096 --rounds 2
    python -m research.exact_blocks --profile     # milliseconds of each step of one score block
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    from bench.common import world
    from clip_density_index.queries.exact import exact_kl

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="pool size")
    ap.add_argument("--queries", type=int, default=1000, help="random queries per side")
    ap.add_argument("--blocks", default="1024x16384,512x4096", help="comma-separated QUERIESxCANDIDATES")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="time each step of one block and stop")
    args = ap.parse_args()
    if args.profile:
        for cq, cn in [tuple(int(v) for v in b.split("x")) for b in args.blocks.split(",")]:
            print(json.dumps(profile_block(cq, cn)), flush=True)
        return
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


def profile_block(cq: int, cn: int, d: int = 512, repeats: int = 10) -> dict:
    """Milliseconds of each step of ``queries.exact.exact_moments`` on one cq x cn block (float32)."""
    import torch

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(cq, d, generator=g), dim=1) * 100
    c = torch.nn.functional.normalize(torch.randn(cn, d, generator=g), dim=1)
    s = q @ c.T
    rm = s.amax(1)
    e = torch.sub(s, rm[:, None]).clamp_(min=-80).exp_()
    es = e * s
    w = torch.exp(rm - rm.max())

    def ms(f) -> float:
        f()
        t0 = time.perf_counter()
        for _ in range(repeats):
            f()
        return round((time.perf_counter() - t0) / repeats * 1e3, 2)

    gemm = ms(lambda: q @ c.T)
    return {"block": f"{cq}x{cn}", "gemm_ms": gemm, "gemm_gflops": round(2 * cq * cn * d / gemm / 1e6, 1),
            "rowmax_ms": ms(lambda: s.amax(1)),
            "sub_clamp_exp_ms": ms(lambda: torch.sub(s, rm[:, None]).clamp_(min=-80).exp_()),
            "exp_underflowing_ms": ms(lambda: torch.exp(s - 200)), "mul_ms": ms(lambda: e * s),
            "row_sums_ms": ms(lambda: (e.sum(1), es.sum(1))), "column_gemvs_ms": ms(lambda: (w @ e, w @ es))}


if __name__ == "__main__":
    main()

"""The GPU check, ready for when a device is lent: the exact pass at DataComp scale on CUDA.

One short script (it must fit a 15-minute device budget, start included): for each pool size it
draws a CLIP-like pool directly on the GPU (clustered unit vectors, d = 768, float16: no CPU-side
world at 12.8M), then

* times the fused exact pass (``queries.exact.exact_moments``, both sides, the code path of
  ``score --estimator exact``) on a slice of caption rows against ALL images, and extrapolates to
  the whole pool (the pass is a sum of identical blocks: time is linear in the rows);
* measures float16 against float32 on the first 2,048 rows (max and mean |KL difference|, Spearman,
  top-25% overlap) so the default GPU precision's error is stated.

Prints one JSON line per pool size and writes them to ``$OUT/gpu.jsonl`` when ``OUT`` is set.

    python -m bench.gpu --sizes 1000000,12800000 --rows 16384
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np


def clip_like(n: int, d: int, seed: int, device: str):
    """Unit texts and images sharing 4,096 concepts (matched pairs close), float16 on ``device``."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(4096, d, device=device, generator=g), dim=1)
    images = torch.empty(n, d, dtype=torch.float16, device=device)
    texts = torch.empty(n, d, dtype=torch.float16, device=device)
    for s in range(0, n, 1 << 20):
        m = min(1 << 20, n - s)
        c = centres[torch.randint(0, 4096, (m,), device=device, generator=g)]
        base = c + 0.9 * torch.randn(m, d, device=device, generator=g) / math.sqrt(d) * 8
        images[s : s + m] = torch.nn.functional.normalize(base + 0.6 * torch.randn(m, d, device=device, generator=g) / math.sqrt(d) * 8, dim=1)
        texts[s : s + m] = torch.nn.functional.normalize(base + 0.6 * torch.randn(m, d, device=device, generator=g) / math.sqrt(d) * 8, dim=1)
    return texts, images


def main() -> None:
    import torch

    from bench.common import machine
    from clip_density_index.queries.exact import exact_moments
    from clip_density_index.queries.accuracy import spearman, top_overlap

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,12800000")
    ap.add_argument("--rows", type=int, default=16384, help="caption rows timed per size")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script's code path")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA GPU (torch sees none)")
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    out_dir = os.environ.get("OUT")
    lines = []
    for n in (int(s) for s in args.sizes.split(",")):
        texts, images = clip_like(n, args.dim, 0, dev)
        rows = min(args.rows, n)
        row = {"n": n, "d": args.dim, "rows_timed": rows, "machine": machine()}
        for precision in ("float16", "float32") if dev == "cuda" else ("float32",):
            sync()
            t0 = time.perf_counter()
            exact_moments(texts[:rows], images, 100.0, rows=True, cols=True, device=dev, precision=precision)
            sync()
            sec = time.perf_counter() - t0
            row[f"{precision}_pairs_per_s"] = rows * n / sec
            row[f"{precision}_extrapolated_both_sides_s"] = n * n / (rows * n / sec)
        q = 2048
        kl = {}
        for precision in ("float16", "float32") if dev == "cuda" else ("float32", "float32"):
            r, _ = exact_moments(texts[:q], images, 100.0, rows=True, cols=False, device=dev, precision=precision)
            kl[precision if precision not in kl else "float16"] = r.s1 / r.s0 - (r.max + np.log(r.s0))  # KL up to the constant log N
        diff = np.abs(kl["float16"] - kl["float32"])
        row.update(fp16_max_abs=float(diff.max()), fp16_mae=float(diff.mean()),
                   fp16_spearman=spearman(kl["float16"], kl["float32"]),
                   fp16_top25_overlap=top_overlap(kl["float16"], kl["float32"]))
        print(json.dumps(row), flush=True)
        lines.append(json.dumps(row))
        del texts, images
        if dev == "cuda":
            torch.cuda.empty_cache()
    if out_dir:
        with open(os.path.join(out_dir, "gpu.jsonl"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

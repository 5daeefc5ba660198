"""Build throughput and peak memory from precomputed embeddings, in child processes (the targets:
>= 100k samples/s for 1M x 512 with ``--index-factory Flat``, peak memory < 2x the embeddings).

For a pool of n samples of the calibrated synthetic world (d = 512) written as

* ``datacomp``: DataComp metadata shards (parquet + npz with ``b32_img`` / ``b32_txt``, unit vectors in
  float16, as DataComp distributes them), 8 shards;
* ``clip-retrieval-f32``: one clip-retrieval shard of raw float32 vectors (a heavier case: twice the
  bytes, and the copy kept by the index is float32 too),

``cli.py build-index --index-factory Flat`` runs in a child process: wall time, samples/s and peak RSS
(``ru_maxrss``) against the size of the input embeddings (image + text). The page cache is warmed
first by reading the input once, so the number is the builder's, not the disk's read speed, and
dirty pages of earlier steps are flushed (``sync``) before each build: the build pays for writing
its own index only. Writes are the noisy part on this machine's virtual disk (~0.5-0.8 GB/s):
repeat (third argument) and read the median.

    python -m bench.build 1000000 bench/out 5      # n, output folder, repetitions
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import log, run_child, save_json, world

PY = sys.executable


def write_datacomp(n: int, folder: Path, shards: int = 8) -> None:
    """DataComp layout: ``{i:032x}.parquet`` (uid, text, url, ...) + ``.npz`` (b32_img, b32_txt float16)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (folder / "done").exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    meta, image, text = world(n, "calibrated", normalise=True)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        m = meta.slice(a, b - a)
        table = pa.table({"uid": m.column("uid"), "text": m.column("caption"),
                          "url": [f"https://example.com/{j}.jpg" for j in range(a, b)],
                          "original_width": np.full(b - a, 512, np.int64),
                          "original_height": np.full(b - a, 384, np.int64)})
        pq.write_table(table, folder / f"{i:032x}.parquet")
        np.savez(folder / f"{i:032x}.npz", b32_img=image[a:b].astype(np.float16),
                 b32_txt=text[a:b].astype(np.float16))
    (folder / "done").write_text(str(n))


def _warm(folder: Path) -> int:
    """Read every file once (page cache); return the bytes of the embedding files."""
    total = 0
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
            if p.suffix in (".npy", ".npz"):
                total += p.stat().st_size
    return total


def run(n: int, out: Path, reps: int = 2) -> dict:
    from bench.pipeline import write_clip_retrieval

    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    res = {"n": n, "runs": []}
    cases = (
        ("datacomp", data / f"dc-{n}", write_datacomp, ["--source", "datacomp", "--arch", "b32"]),
        ("clip-retrieval-f32", data / f"cr-{n}", write_clip_retrieval,
         ["--source", "clip-retrieval", "--uid-column", "uid"]),
    )
    for label, folder, writer, args in cases:
        t0 = time.perf_counter()
        writer(n, folder)
        log(f"build bench {label}: input written in {time.perf_counter() - t0:.1f}s")
        for rep in range(reps):
            emb_bytes = _warm(folder)
            idx = out / f"idx-{label}"
            shutil.rmtree(idx, ignore_errors=True)
            os.sync()  # earlier steps' dirty pages are flushed first: the build pays for its own writes only
            time.sleep(2)
            r = run_child([PY, "cli.py", "build-index", *args, "--input", folder, "--out", idx,
                           "--index-factory", "Flat", "--quiet"], out / "build.log")
            r.pop("stdout", None)
            r.update({"case": label, "rep": rep, "embeddings_bytes": emb_bytes,
                      "samples_per_s": n / r["seconds"],
                      "peak_over_embeddings": r["peak_rss_bytes"] / emb_bytes})
            res["runs"].append(r)
            log(f"  {label} rep {rep}: {r['seconds']:.2f}s = {r['samples_per_s']:,.0f} samples/s, peak "
                f"{r['peak_rss_bytes'] / 2**30:.2f} GiB = {r['peak_over_embeddings']:.2f}x the "
                f"{emb_bytes / 2**30:.2f} GiB of input embeddings (rc {r['rc']})")
            shutil.rmtree(idx, ignore_errors=True)
            save_json(res, out / "build.json")
    return res


if __name__ == "__main__":
    res = run(int(sys.argv[1]), Path(sys.argv[2]), reps=int(sys.argv[3]) if len(sys.argv) > 3 else 3)
    for case in dict.fromkeys(r["case"] for r in res["runs"]):
        rs = [r for r in res["runs"] if r["case"] == case]
        med = sorted(r["seconds"] for r in rs)[len(rs) // 2]
        print(json.dumps({"case": case, "seconds": [round(r["seconds"], 2) for r in rs], "median_s": round(med, 2),
                          "median_samples_per_s": round(res["n"] / med),
                          "peak_over_embeddings": round(max(r["peak_over_embeddings"] for r in rs), 2)}))

"""open_clip encoding throughput with a tiny randomly initialised model.

No pretrained weights and no network: the tests' tiny architecture (``tests/tiny_clip.py``) is
registered with open_clip, its random weights are saved to a local checkpoint, and an image folder of
small PNGs + a captions CSV is encoded by ``indexer.embed.OpenClipSource`` (the code path of
``build-index --source open_clip``). The number measures the pipeline around the model (image
decoding, preprocessing, tokenising, batching, the DataLoader) plus a very small network; a real
ViT-B/32 on a CPU is far slower and bounded by the network.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.common import log, save_json
from tests.tiny_clip import TINY_CFG, save_tiny_model

TINY = "cdi-tiny-bench"


def run(out: Path, n: int = 2000, batch_size: int = 256) -> dict:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    from PIL import Image

    from clip_density_index.indexer.build import build_index
    from clip_density_index.indexer.embed import OpenClipSource

    work = out / "encode"
    ckpt = save_tiny_model(work, TINY)
    images = work / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        p = images / f"{i:06d}.png"
        if not p.exists():
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
        names.append(p.name)
    caps = work / "captions.csv"
    pacsv.write_csv(pa.table({"image": names, "caption": [f"a photo of thing number {i}" for i in range(n)]}), caps)
    res = {"n": n, "batch_size": batch_size, "model": TINY_CFG, "image_size_px": 64}
    for workers in (0, 2):
        src = OpenClipSource(images, caps, TINY, str(ckpt), batch_size=batch_size, num_workers=workers, device="cpu")
        t0 = time.perf_counter()
        rows = sum(len(b.meta) for b in src.batches(batch_size))
        dt = time.perf_counter() - t0
        res[f"encode_workers{workers}"] = {"rows": rows, "seconds": dt, "samples_per_s": rows / dt}
        log(f"encode (tiny model, {workers} workers): {rows / dt:,.0f} samples/s")
    src = OpenClipSource(images, caps, TINY, str(ckpt), batch_size=batch_size, num_workers=2, device="cpu")
    t0 = time.perf_counter()
    build_index(src, work / "idx", batch_size=batch_size)
    dt = time.perf_counter() - t0
    res["build_index"] = {"seconds": dt, "samples_per_s": n / dt}
    log(f"build-index --source open_clip (tiny model): {n / dt:,.0f} samples/s")
    save_json(res, out / "encode.json")
    return res

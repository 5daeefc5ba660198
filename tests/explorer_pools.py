"""A small open_clip-source pool built from generated images, for the explorer's tests: a tiny
randomly initialised open_clip model (a local checkpoint, no download), an image folder of coloured
shapes, and one caption row whose image lies OUTSIDE the folder (``../outside.png``), which the
explorer must not serve."""

from __future__ import annotations

import json
from pathlib import Path

TINY = "cdi-tiny-explorer"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
COLOURS = {"red": (220, 50, 50), "green": (60, 170, 80), "blue": (60, 90, 210), "yellow": (235, 200, 40)}
SHAPES = ("circle", "square")


def shape_image(colour: str, shape: str, i: int):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (96, 96), (245, 245, 240))
    d = ImageDraw.Draw(im)
    box = (14 + i % 5, 14 + i % 7, 80 - i % 3, 80 - i % 4)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    return im


def build_openclip_pool(tmp: Path, n: int = 16) -> tuple[Path, Path]:
    """Build the pool under ``tmp``; return (index directory, the outside image's path)."""
    import open_clip
    import torch

    from clip_density_index import queries
    from clip_density_index.indexer.build import build_index
    from clip_density_index.indexer.embed import OpenClipSource

    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "configs").mkdir(exist_ok=True)
    (tmp / "configs" / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(tmp / "configs")
    torch.manual_seed(0)
    ckpt = tmp / f"{TINY}.pt"
    torch.save(open_clip.create_model(TINY).state_dict(), ckpt)
    root = tmp / "images"
    root.mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % 2]
        name = f"img_{i:02d}.{'png' if i % 2 else 'jpg'}"
        shape_image(colour, shape, i).save(root / name)
        rows.append((name, f"a {colour} {shape}"))
    outside = tmp / "outside.png"
    shape_image("red", "circle", 99).save(outside)
    rows.append(("../outside.png", "a picture outside the image folder"))
    captions = tmp / "captions.csv"
    captions.write_text("image,caption\n" + "".join(f"{a},{b}\n" for a, b in rows))
    out = tmp / "idx"
    build_index(OpenClipSource(root, captions, TINY, str(ckpt), batch_size=8, num_workers=0, device="cpu"), out)
    with queries.open_index(out) as pool:
        queries.score(pool, estimator="exact")
    return out, outside

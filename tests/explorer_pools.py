"""A small open_clip-source pool built from generated images, for the explorer's tests: a tiny
randomly initialised open_clip model (``tiny_clip``: a local checkpoint, no download), an image
folder of coloured shapes, and one caption row whose image lies OUTSIDE the folder
(``../outside.png``), which the explorer must not serve."""

from __future__ import annotations

from pathlib import Path

from tiny_clip import save_tiny_model

TINY = "cdi-tiny-explorer"
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
    from clip_density_index import queries
    from clip_density_index.indexer.build import build_index
    from clip_density_index.indexer.embed import OpenClipSource

    tmp.mkdir(parents=True, exist_ok=True)
    ckpt = save_tiny_model(tmp, TINY)
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

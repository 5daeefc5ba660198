"""load_model / OpenClipSource / encode_texts with a tiny randomly initialised open_clip model.

No pretrained weights: the ``models`` fixture (conftest.py, ``tiny_clip``) registers a tiny
architecture and saves its random state dict to a local checkpoint; the tests load it back through
``load_model(name, pretrained=<path>)``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from clip_density_index.indexer.embed import OpenClipSource, encode_texts, load_model  # noqa: E402
from clip_density_index.indexer.errors import BadInput, InvalidParameter  # noqa: E402
from clip_density_index.indexer.reader import md5_uid  # noqa: E402
from tiny_clip import TINY, TINY_BIASED  # noqa: E402

N_IMAGES = 10


@pytest.fixture(scope="module")
def bundle(models):
    return load_model(TINY, str(models[TINY]), device="cpu")


def make_image(i: int) -> Image.Image:
    """Solid colours and gradients of varying sizes."""
    w, h = 40 + 4 * i, 48 - 2 * i
    if i % 2 == 0:
        return Image.new("RGB", (w, h), ((37 * i) % 256, (91 * i) % 256, (53 * i + 100) % 256))
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 20.0 * i)], axis=2)
    return Image.fromarray(arr.astype(np.uint8))


def image_bytes(i: int) -> tuple[str, bytes]:
    ext = "png" if i % 3 == 0 else "jpg"
    buf = io.BytesIO()
    make_image(i).save(buf, format="PNG" if ext == "png" else "JPEG")
    return ext, buf.getvalue()


def captions_for(n: int) -> list[str]:
    return [f"a picture number {i} of {'stripes' if i % 2 else 'a colour'}" for i in range(n)]


@pytest.fixture
def folder(tmp_path, rng):
    """images/ with N_IMAGES files (some in a subfolder) and a captions table."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    rels = []
    for i in range(N_IMAGES):
        ext, data = image_bytes(i)
        rel = f"{'sub/' if i % 4 == 1 else ''}img_{i:02d}.{ext}"
        (root / rel).write_bytes(data)
        rels.append(rel)
    table = pa.table({"image": rels, "caption": captions_for(N_IMAGES),
                      "width": [make_image(i).width for i in range(N_IMAGES)],
                      "uid_given": [bytes(b).hex() for b in
                                    rng.integers(0, 256, (N_IMAGES, 16), dtype=np.uint8)]})
    return root, table


def write_captions(table: pa.Table, path: Path) -> Path:
    kind = path.suffix
    if kind == ".parquet":
        pq.write_table(table, path)
    elif kind == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    else:
        sep = "\t" if kind == ".tsv" else ","
        lines = [sep.join(table.column_names)]
        lines += [sep.join(str(v) for v in r.values()) for r in table.to_pylist()]
        path.write_text("\n".join(lines) + "\n")
    return path


def make_tar(path: Path, indices, garbage: int | None = None, with_json: bool = True) -> list[str]:
    """A webdataset shard; returns the image member names in order."""
    members = []
    with tarfile.open(path, "w") as tf:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        for i in indices:
            key = f"{i:05d}"
            ext, data = image_bytes(i)
            if i == garbage:
                ext, data = "jpg", b"this is not a jpeg" * 10
            add(f"{key}.{ext}", data)
            add(f"{key}.txt", captions_for(N_IMAGES)[i].encode())
            if with_json:
                add(f"{key}.json", json.dumps({"url": f"http://x/{i}", "uid": md5_uid(f"u{i}")}).encode())
            members.append(f"{key}.{ext}")
    return members


def direct(bundle, images: list[Image.Image], captions: list[str]):
    """What the model computes on the same preprocessed inputs, unnormalised, in one batch."""
    model, preprocess, tokenizer = bundle
    with torch.no_grad():
        img = (model.encode_image(torch.stack([preprocess(im.convert("RGB")) for im in images])).numpy()
               if images else None)
        txt = model.encode_text(tokenizer(captions)).numpy() if captions else None
    return img, txt


def collect(source, batch_size: int):
    batches = list(source.batches(batch_size))
    return (batches, pa.concat_tables([b.meta for b in batches]),
            np.concatenate([b.image for b in batches]), np.concatenate([b.text for b in batches]))


def recording_progress(log: list):
    @contextlib.contextmanager
    def progress(label, total):
        log.append(("start", label, total))
        yield lambda n: log.append(("advance", n))

    return progress


# ------------------------------------------------------------------------------------------- load_model


def test_load_model_from_local_checkpoint(models, bundle):
    model, preprocess, tokenizer = bundle
    assert not model.training
    reference = open_clip.create_model(TINY)
    reference.load_state_dict(torch.load(models[TINY]))
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), name
    assert tokenizer(["a cat"]).shape == (1, 16)
    assert preprocess(make_image(1)).shape == (3, 32, 32)


def test_load_model_errors(models, tmp_path):
    with pytest.raises(InvalidParameter, match=r"Unknown open_clip model 'ViT-Nope-99'.*ViT-B-32"):
        load_model("ViT-Nope-99", None, device="cpu")
    missing = tmp_path / "missing.pt"
    with pytest.raises(BadInput, match=rf"Checkpoint file {re.escape(str(missing))} does not exist"):
        load_model(TINY, str(missing), device="cpu")
    with pytest.raises(InvalidParameter, match=r"Unknown pretrained tag 'lion9b'.*laion2b_s34b_b79k"):
        load_model("ViT-B-32", "lion9b", device="cpu")
    # a checkpoint of another architecture (it has a logit_bias the tiny CLIP lacks)
    other = re.escape(str(models[TINY_BIASED]))
    with pytest.raises(BadInput, match=rf"Cannot load {TINY} with pretrained='{other}'") as e:
        load_model(TINY, str(models[TINY_BIASED]), device="cpu")
    assert "\n" not in str(e.value) and "is it a state dict of" in str(e.value)  # one line, with a hint
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(BadInput, match=r"Cannot load .*notes.pt.*is it a state dict of"):
        load_model(TINY, str(text), device="cpu")


def test_encode_texts_is_raw_encode_text(bundle):
    texts = captions_for(5)
    got = encode_texts(bundle, texts, batch_size=2)
    _, want = direct(bundle, [], texts)
    assert got.dtype == np.float32 and got.shape == (5, 32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)  # not normalised


# ------------------------------------------------------------------------------------- image folder


def test_folder_source_matches_direct_encoding(models, bundle, folder, tmp_path):
    root, table = folder
    captions = write_captions(table, tmp_path / "captions.csv")
    log: list = []
    src = OpenClipSource(root, captions, TINY, str(models[TINY]), batch_size=4, num_workers=0,
                         device="cpu", progress=recording_progress(log), bundle=bundle)
    info = src.info
    assert (info.source, info.n, info.dim, info.raw_known) == ("open_clip", N_IMAGES, 32, True)
    assert info.model == TINY and info.pretrained == str(models[TINY])
    assert info.logit_scale == pytest.approx(float(bundle.model.logit_scale.detach().exp()))
    assert info.logit_scale == pytest.approx(1 / 0.07, rel=1e-6) and info.logit_bias is None

    batches, meta, image, text = collect(src, 3)
    assert meta.column_names == ["uid", "caption", "image", "width", "uid_given"]
    assert meta.column("caption").to_pylist() == captions_for(N_IMAGES)
    assert meta.column("uid").to_pylist() == [md5_uid(r) for r in table.column("image").to_pylist()]
    assert [(b.origin, b.row_offset, len(b.meta)) for b in batches] == [
        (str(captions), o, min(3, N_IMAGES - o)) for o in range(0, N_IMAGES, 3)]
    with Image.open(root / table.column("image")[1].as_py()) as im:
        assert im.size == make_image(1).size
    imgs = [Image.open(root / r) for r in table.column("image").to_pylist()]
    want_img, want_txt = direct(bundle, imgs, captions_for(N_IMAGES))
    np.testing.assert_allclose(image, want_img, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(text, want_txt, rtol=1e-5, atol=1e-5)
    assert image.dtype == np.float32 and src.skipped == []
    assert log[0] == ("start", "Encoding images and captions", N_IMAGES)
    assert sum(e[1] for e in log[1:]) == N_IMAGES


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl", ".parquet"])
def test_folder_source_caption_formats(models, bundle, folder, tmp_path, suffix):
    root, table = folder
    captions = write_captions(table, tmp_path / f"captions{suffix}")
    src = OpenClipSource(root, captions, TINY, str(models[TINY]), uid_column="uid_given",
                         num_workers=0, bundle=bundle)
    _, meta, _, text = collect(src, 100)
    assert meta.column("caption").to_pylist() == captions_for(N_IMAGES)
    assert meta.column("uid").to_pylist() == table.column("uid_given").to_pylist()
    assert "uid_given" not in meta.column_names and meta.column("image").type == pa.string()
    np.testing.assert_allclose(text, direct(bundle, [], captions_for(N_IMAGES))[1], rtol=1e-5, atol=1e-5)


def test_folder_bad_image_raises_naming_it(models, bundle, folder, tmp_path):
    root, table = folder
    bad = root / table.column("image")[4].as_py()
    bad.write_bytes(b"\x00garbage bytes, not an image" * 5)
    captions = write_captions(table, tmp_path / "captions.csv")
    src = OpenClipSource(root, captions, TINY, str(models[TINY]), num_workers=0, bundle=bundle)
    where = rf"{re.escape(str(bad))} \(row 4 of .*captions\.csv\)"
    with pytest.raises(BadInput, match=rf"{where}: cannot decode image"):
        collect(src, 100)


def test_folder_missing_images_are_found_before_encoding(models, bundle, folder, tmp_path):
    root, table = folder
    (root / table.column("image")[6].as_py()).unlink()
    (root / table.column("image")[8].as_py()).unlink()
    captions = write_captions(table, tmp_path / "captions.csv")
    with pytest.raises(BadInput, match=r"row 6 of .*captions\.csv\): file not found; 1 more rows have problems"):
        OpenClipSource(root, captions, TINY, str(models[TINY]), num_workers=0, bundle=bundle)


def test_folder_skip_bad_reports_and_skips(models, bundle, folder, tmp_path):
    root, table = folder
    bad = root / table.column("image")[4].as_py()
    bad.write_bytes(b"\x00garbage bytes, not an image" * 5)
    missing = root / table.column("image")[7].as_py()
    missing.unlink()
    captions = write_captions(table, tmp_path / "captions.csv")
    src = OpenClipSource(root, captions, TINY, str(models[TINY]), batch_size=4, num_workers=0,
                         skip_bad=True, bundle=bundle)
    assert src.info.n == N_IMAGES  # upper bound
    batches, meta, image, text = collect(src, 100)
    kept = [i for i in range(N_IMAGES) if i not in (4, 7)]
    assert [p for p, _ in src.skipped] == [str(bad), str(missing)]
    assert "cannot decode image" in src.skipped[0][1] and src.skipped[1][1] == "file not found"
    assert meta.column("caption").to_pylist() == [captions_for(N_IMAGES)[i] for i in kept]
    # batches never span a skipped row, so row_offset + i is the captions row
    assert [(b.row_offset, len(b.meta)) for b in batches] == [(0, 4), (5, 2), (8, 2)]
    imgs = [Image.open(root / table.column("image")[i].as_py()) for i in kept]
    want_img, _ = direct(bundle, imgs, [])
    np.testing.assert_allclose(image, want_img, rtol=1e-5, atol=1e-5)


def test_folder_input_errors(models, bundle, folder, tmp_path):
    root, table = folder
    captions = write_captions(table, tmp_path / "captions.csv")
    kw = dict(model=TINY, pretrained=str(models[TINY]), num_workers=0, bundle=bundle)
    with pytest.raises(BadInput, match=rf"Image input {re.escape(str(tmp_path / 'nope'))} does not exist"):
        OpenClipSource(tmp_path / "nope", captions, **kw)
    with pytest.raises(BadInput, match=rf"{re.escape(str(captions))} has no 'path' column; columns: image"):
        OpenClipSource(root, captions, image_column="path", **kw)
    with pytest.raises(BadInput, match=rf"Captions file {re.escape(str(tmp_path / 'c.csv'))} does not exist"):
        OpenClipSource(root, tmp_path / "c.csv", **kw)
    with pytest.raises(BadInput, match="unsupported format '.xlsx'"):
        OpenClipSource(root, write_captions(table, tmp_path / "c.xlsx"), **kw)
    with pytest.raises(BadInput, match=r"No captions file given and no \.tar shards"):
        OpenClipSource(root, None, **kw)
    bad_uid = table.set_column(3, "uid_given", pa.array(["xyz"] * N_IMAGES))
    with pytest.raises(BadInput, match=r"captions2\.csv row 0: uid 'xyz' is not 32 hex digits"):
        OpenClipSource(root, write_captions(bad_uid, tmp_path / "captions2.csv"), uid_column="uid_given",
                       **kw)


# -------------------------------------------------------------------------------------- webdataset


def test_tar_shards_match_direct_encoding(models, bundle, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    m0 = make_tar(shards / "shard-2.tar", range(0, 6))
    m1 = make_tar(shards / "shard-10.tar", range(6, N_IMAGES))  # natural order: 2 before 10
    src = OpenClipSource(shards, None, TINY, str(models[TINY]), batch_size=4, num_workers=2,
                         bundle=bundle)
    assert src.info.n == N_IMAGES and src.info.extra["format"] == "webdataset"
    batches, meta, image, text = collect(src, 4)
    assert meta.column_names == ["uid", "caption", "key", "json"]
    assert meta.column("caption").to_pylist() == captions_for(N_IMAGES)
    assert meta.column("key").to_pylist() == [f"{i:05d}" for i in range(N_IMAGES)]
    assert json.loads(meta.column("json")[7].as_py())["url"] == "http://x/7"
    assert meta.column("uid").to_pylist() == ([md5_uid(f"shard-2.tar/{m}") for m in m0]
                                               + [md5_uid(f"shard-10.tar/{m}") for m in m1])
    assert [(Path(b.origin).name, b.row_offset, len(b.meta)) for b in batches] == [
        ("shard-2.tar", 0, 4), ("shard-2.tar", 4, 2), ("shard-10.tar", 0, 4)]
    imgs = [Image.open(io.BytesIO(image_bytes(i)[1])) for i in range(N_IMAGES)]
    want_img, want_txt = direct(bundle, imgs, captions_for(N_IMAGES))
    np.testing.assert_allclose(image, want_img, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(text, want_txt, rtol=1e-5, atol=1e-5)


def test_single_tar_with_uid_from_json(models, bundle, tmp_path):
    tar = tmp_path / "one.tar"
    make_tar(tar, range(4))
    src = OpenClipSource(tar, None, TINY, str(models[TINY]), uid_column="uid", num_workers=0, bundle=bundle)
    _, meta, _, _ = collect(src, 100)
    assert meta.column("uid").to_pylist() == [md5_uid(f"u{i}") for i in range(4)]
    with pytest.raises(InvalidParameter, match="captions file goes with an image folder"):
        OpenClipSource(tar, tmp_path / "captions.csv", TINY, None, bundle=bundle)


def test_tar_bad_image_raises_or_is_skipped(models, bundle, tmp_path):
    tar = tmp_path / "bad.tar"
    make_tar(tar, range(6), garbage=3, with_json=False)
    kw = dict(model=TINY, pretrained=str(models[TINY]), num_workers=0, bundle=bundle)
    where = rf"{re.escape(str(tar))}:00003\.jpg \(row 3 of .*bad\.tar\)"
    with pytest.raises(BadInput, match=rf"{where}: cannot decode"):
        collect(OpenClipSource(tar, None, **kw), 100)
    src = OpenClipSource(tar, None, skip_bad=True, **kw)
    batches, meta, _, _ = collect(src, 100)
    assert src.skipped[0][0] == f"{tar}:00003.jpg" and len(src.skipped) == 1
    assert meta.column("key").to_pylist() == ["00000", "00001", "00002", "00004", "00005"]
    assert meta.column_names == ["uid", "caption", "key"]
    assert [(b.row_offset, len(b.meta)) for b in batches] == [(0, 3), (4, 2)]
    with pytest.raises(BadInput, match=rf"uid_column='uid' but the shards at {re.escape(str(tar))} have no"):
        OpenClipSource(tar, None, uid_column="uid", **kw)
    with pytest.raises(InvalidParameter, match=r"name columns of a captions file; .tar shards pair"):
        OpenClipSource(tar, None, caption_column="text", **kw)  # not silently ignored


def test_truncated_shard_stops_the_build_or_keeps_what_it_can_with_skip_bad(models, bundle, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    make_tar(shards / "a.tar", range(3), with_json=False)
    make_tar(shards / "b.tar", range(3, 9), with_json=False)
    data = (shards / "b.tar").read_bytes()
    (shards / "b.tar").write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    (shards / "c.tar").write_bytes(b"not a tar at all" * 40)
    kw = dict(model=TINY, pretrained=str(models[TINY]), num_workers=0, bundle=bundle)
    with pytest.raises(BadInput, match=r"Cannot read tar shard .*b\.tar: .*--skip-bad"):
        OpenClipSource(shards, None, **kw)
    src = OpenClipSource(shards, None, skip_bad=True, **kw)
    _, meta, image, _ = collect(src, 100)
    keys = meta.column("key").to_pylist()
    assert keys[:3] == ["00000", "00001", "00002"] and 3 < len(keys) < 9  # b.tar's first members kept
    reasons = dict(src.skipped)
    assert "unreadable tar shard" in reasons[str(shards / "b.tar")]
    assert "unreadable tar shard" in reasons[str(shards / "c.tar")]
    assert np.all(np.isfinite(image))


def test_tar_reading_keeps_few_files_open(models, bundle, tmp_path, monkeypatch):
    """One descriptor per shard, never closed, hit the open-files limit on large shard sets."""
    from clip_density_index.indexer import embed

    shards = tmp_path / "many"
    shards.mkdir()
    for s in range(12):
        make_tar(shards / f"{s:03d}.tar", [s % N_IMAGES], with_json=False)
    monkeypatch.setattr(embed._TarDataset, "MAX_OPEN_SHARDS", 3)
    opened, closed = [], []
    real_open, real_close = embed.os.open, embed.os.close
    monkeypatch.setattr(embed.os, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    monkeypatch.setattr(embed.os, "close", lambda fd: closed.append(fd) or real_close(fd))
    src = OpenClipSource(shards, None, model=TINY, pretrained=str(models[TINY]), num_workers=0, bundle=bundle)
    _, meta, _, _ = collect(src, 100)
    assert meta.num_rows == 12 and len(opened) == 12 and len(opened) - len(closed) <= 3


def _identity(img):
    return np.asarray(img)


def test_images_are_read_upright_and_at_8_bits():
    from clip_density_index.indexer.embed import _load_image

    grad = np.tile(np.linspace(0, 1, 64), (32, 1))  # dark on the left, bright on the right
    eight = _load_image(_identity, _png(Image.fromarray(np.rint(grad * 255).astype(np.uint8))))
    sixteen = _load_image(_identity, _png(Image.fromarray(np.rint(grad * 65535).astype(np.uint16))))
    assert np.abs(sixteen.astype(int) - eight.astype(int)).max() <= 1  # was: all 255 (white)
    dark = _load_image(_identity, _png(Image.fromarray(np.full((8, 8), 200, dtype=np.uint16))))
    assert dark.max() <= 1  # 200 of 65535 is nearly black, not 200 of 255
    as_float = _load_image(_identity, _tiff(Image.fromarray(grad.astype(np.float32), mode="F")))
    assert np.abs(as_float.astype(int) - eight.astype(int)).max() <= 1  # was: all 0 (black)
    # EXIF orientation 6 (rotate 90 degrees clockwise to view): a 64 x 32 photo is seen as 32 x 64
    photo = Image.fromarray(np.rint(grad * 255).astype(np.uint8)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", exif=exif.tobytes())
    upright = _load_image(_identity, buf.getvalue())
    assert upright.shape == (64, 32, 3)
    assert upright[0].mean() < 30 and upright[-1].mean() > 220  # the dark left edge is now on top


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tiff(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    return buf.getvalue()


def test_siglip_like_model_records_logit_bias(models, folder, tmp_path):
    root, table = folder
    captions = write_captions(table.slice(0, 2), tmp_path / "captions.csv")
    src = OpenClipSource(root, captions, TINY_BIASED, str(models[TINY_BIASED]), num_workers=0, device="cpu")
    assert src.info.logit_bias == pytest.approx(-10.0)
    assert src.info.pretrained == str(models[TINY_BIASED])

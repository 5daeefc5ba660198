"""DataCompSource and ClipRetrievalSource on small seeded fixtures, including every bad input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from clip_density_index.indexer.errors import BadInput, InvalidParameter
from clip_density_index.indexer.reader import (ClipRetrievalSource, DataCompSource, UidDeriver, md5_uid,
                            normalize_uids)

HEX32 = re.compile(r"^[0-9a-f]{32}$")
DIMS = {"b32": 16, "l14": 24}
SIZES = (37, 23)  # rows per shard; the batch size 10 divides neither


def unit_f16(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def hex_uids(rng: np.random.Generator, n: int) -> list[str]:
    """uuid4().hex-style 128-bit uids drawn from the seeded rng."""
    return [bytes(b).hex() for b in rng.integers(0, 256, (n, 16), dtype=np.uint8)]


def make_datacomp(root: Path, rng: np.random.Generator, sizes=SIZES, compressed=(False, True),
                  upper=False) -> dict:
    """Two DataComp shards; the second npz is compressed (not memory-mappable)."""
    root.mkdir(parents=True, exist_ok=True)
    expected = {"uid": [], "text": [], "url": []} | {f"{a}_{m}": [] for a in DIMS for m in ("img", "txt")}
    for s, n in enumerate(sizes):
        uids = hex_uids(rng, n)
        text = [f"caption {s}-{i}" for i in range(n)]
        url = [f"http://example.com/{s}/{i}.jpg" for i in range(n)]
        arrays = {f"{a}_{m}": unit_f16(rng, n, d) for a, d in DIMS.items() for m in ("img", "txt")}
        table = pa.table({
            "uid": [u.upper() for u in uids] if upper else uids, "url": url, "text": text,
            "original_width": rng.integers(64, 1024, n), "original_height": rng.integers(64, 1024, n),
            "clip_b32_similarity_score": rng.random(n).astype(np.float32),
            "clip_l14_similarity_score": rng.random(n).astype(np.float32),
        })
        stem = f"{s:032x}"
        pq.write_table(table, root / f"{stem}.parquet")
        (np.savez_compressed if compressed[s] else np.savez)(root / f"{stem}.npz", **arrays)
        expected["uid"] += uids
        expected["text"] += text
        expected["url"] += url
        for k, v in arrays.items():
            expected[k].append(v)
    return {k: (np.concatenate(v) if k.endswith(("img", "txt")) else v) for k, v in expected.items()}


def make_clip_retrieval(root: Path, rng: np.random.Generator, sizes=SIZES, dim=16,
                        with_path=True) -> dict:
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    expected = {"image": [], "text": [], "caption": [], "image_path": []}
    for s, n in enumerate(sizes):
        img, txt = unit_f16(rng, n, dim), unit_f16(rng, n, dim)
        cols = {"caption": [f"text {s}/{i}" for i in range(n)],
                "url": [f"http://x/{s}/{i}" for i in range(n)]}
        if with_path:
            cols = {"image_path": [f"/data/{s}/{i}.jpg" for i in range(n)]} | cols
        np.save(root / "img_emb" / f"img_emb_{s:02d}.npy", img)
        np.save(root / "text_emb" / f"text_emb_{s:02d}.npy", txt)
        pq.write_table(pa.table(cols), root / "metadata" / f"metadata_{s:02d}.parquet")
        expected["image"].append(img)
        expected["text"].append(txt)
        expected["caption"] += cols["caption"]
        expected["image_path"] += cols.get("image_path", [None] * n)
    expected["image"] = np.concatenate(expected["image"])
    expected["text"] = np.concatenate(expected["text"])
    return expected


def collect(source, batch_size: int):
    batches = list(source.batches(batch_size))
    meta = pa.concat_tables([b.meta for b in batches])
    image = np.concatenate([b.image for b in batches])
    text = np.concatenate([b.text for b in batches])
    return batches, meta, image, text


# ---------------------------------------------------------------------------------------------- DataComp


@pytest.mark.parametrize("arch", ["b32", "l14"])
def test_datacomp_reads_everything(tmp_path, rng, arch):
    exp = make_datacomp(tmp_path / "dc", rng)
    src = DataCompSource(tmp_path / "dc", arch=arch, logit_scale=100.0)
    assert src.info.n == sum(SIZES) and src.info.dim == DIMS[arch]
    assert src.info.source == "datacomp" and not src.info.raw_known and src.info.dtype == "float16"
    assert src.info.model == f"datacomp-{arch}" and src.info.logit_scale == 100.0
    assert src.info.extra["open_clip_model"] == {"b32": "ViT-B-32", "l14": "ViT-L-14"}[arch]
    # shard 0 (np.savez) is memory-mapped, shard 1 (np.savez_compressed) is loaded per array
    assert src._shards[0].image.data_offset is not None and src._shards[1].image.data_offset is None

    batches, meta, image, text = collect(src, 10)
    assert meta.column_names[:2] == ["uid", "caption"]
    assert "text" not in meta.column_names and "url" in meta.column_names
    assert "clip_l14_similarity_score" in meta.column_names
    assert meta.column("uid").to_pylist() == exp["uid"]
    assert meta.column("caption").to_pylist() == exp["text"]
    assert meta.column("url").to_pylist() == exp["url"]
    assert image.dtype == np.float16 and text.dtype == np.float16  # as stored; the builder converts
    np.testing.assert_array_equal(image, exp[f"{arch}_img"])
    np.testing.assert_array_equal(text, exp[f"{arch}_txt"])

    # streaming: no batch spans two files, batches <= 10 rows, origin/row_offset locate the rows
    assert [len(b.meta) for b in batches] == [10, 10, 10, 7, 10, 10, 3]
    assert all(b.image.flags.c_contiguous for b in batches)
    files = sorted((tmp_path / "dc").glob("*.parquet"))
    assert [(Path(b.origin), b.row_offset) for b in batches] == (
        [(files[0], o) for o in (0, 10, 20, 30)] + [(files[1], o) for o in (0, 10, 20)])


def test_half_precision_inputs_are_stored_in_half_precision_by_default(tmp_path, rng):
    """build_index(dtype="auto"): float16 DataComp files give a float16 copy (nothing is lost:
    the input had no more precision); float32 inputs stay float32."""
    from clip_density_index.indexer.build import build_index
    from clip_density_index.indexer.pool import open_index

    exp = make_datacomp(tmp_path / "dc", rng)
    build_index(DataCompSource(tmp_path / "dc", arch="b32"), tmp_path / "idx")
    pool = open_index(tmp_path / "idx")
    assert pool.embeddings("image").dtype == np.float16 and pool.manifest["embedding_dtype"] == "float16"
    v = exp["b32_img"].astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    np.testing.assert_allclose(pool.embeddings("image"), v, atol=2e-3)
    build_index(DataCompSource(tmp_path / "dc", arch="b32"), tmp_path / "f32", dtype="float32")
    assert open_index(tmp_path / "f32").embeddings("text").dtype == np.float32


def test_datacomp_lowercases_uids(tmp_path, rng):
    exp = make_datacomp(tmp_path / "dc", rng, upper=True)
    _, meta, _, _ = collect(DataCompSource(tmp_path / "dc"), 1000)
    assert meta.column("uid").to_pylist() == exp["uid"]
    assert all(HEX32.match(u) for u in meta.column("uid").to_pylist())


def test_datacomp_can_iterate_twice(tmp_path, rng):
    make_datacomp(tmp_path / "dc", rng)
    src = DataCompSource(tmp_path / "dc")
    a, b = collect(src, 16), collect(src, 64)
    assert a[1].equals(b[1])
    np.testing.assert_array_equal(a[2], b[2])


def test_datacomp_bad_uid_names_file_and_row(tmp_path, rng):
    make_datacomp(tmp_path / "dc", rng)
    path = sorted((tmp_path / "dc").glob("*.parquet"))[1]
    table = pq.read_table(path)
    uids = table.column("uid").to_pylist()
    uids[5] = "not-a-uid"
    pq.write_table(table.set_column(0, "uid", pa.array(uids)), path)
    with pytest.raises(BadInput, match=rf"{re.escape(str(path))} row 5: uid 'not-a-uid'"):
        collect(DataCompSource(tmp_path / "dc"), 10)


def test_datacomp_missing_dir(tmp_path):
    with pytest.raises(BadInput, match=re.escape(str(tmp_path / "nope"))):
        DataCompSource(tmp_path / "nope")


def test_datacomp_empty_dir(tmp_path):
    (tmp_path / "dc").mkdir()
    with pytest.raises(BadInput, match="No DataComp shards"):
        DataCompSource(tmp_path / "dc")


def test_datacomp_missing_npz(tmp_path, rng):
    make_datacomp(tmp_path / "dc", rng)
    npz = sorted((tmp_path / "dc").glob("*.npz"))[1]
    npz.unlink()
    with pytest.raises(BadInput, match=re.escape(str(npz))):
        DataCompSource(tmp_path / "dc")


def test_datacomp_npz_without_parquet(tmp_path, rng):
    make_datacomp(tmp_path / "dc", rng)
    parquet = sorted((tmp_path / "dc").glob("*.parquet"))[0]
    parquet.unlink()
    with pytest.raises(BadInput, match=re.escape(str(parquet.with_suffix(".npz")))):
        DataCompSource(tmp_path / "dc")


def test_datacomp_missing_key_lists_present_keys(tmp_path, rng):
    make_datacomp(tmp_path / "dc", rng)
    npz = sorted((tmp_path / "dc").glob("*.npz"))[0]
    arrays = dict(np.load(npz))
    del arrays["l14_txt"]
    np.savez(npz, **arrays)
    DataCompSource(tmp_path / "dc", arch="b32")  # b32 arrays are all there
    with pytest.raises(BadInput, match=rf"{re.escape(str(npz))} has no array 'l14_txt'.*b32_img"):
        DataCompSource(tmp_path / "dc", arch="l14")


def test_datacomp_row_count_mismatch(tmp_path, rng):
    make_datacomp(tmp_path / "dc", rng)
    parquet = sorted((tmp_path / "dc").glob("*.parquet"))[0]
    pq.write_table(pq.read_table(parquet).slice(0, 30), parquet)
    with pytest.raises(BadInput) as err:
        DataCompSource(tmp_path / "dc")
    msg = str(err.value)
    assert str(parquet) in msg and str(parquet.with_suffix(".npz")) in msg
    assert "30 rows" in msg and "37" in msg


def test_datacomp_dim_mismatch_between_shards(tmp_path, rng):
    make_datacomp(tmp_path / "dc", rng)
    npz = sorted((tmp_path / "dc").glob("*.npz"))[1]
    arrays = dict(np.load(npz))
    arrays["b32_img"], arrays["b32_txt"] = arrays["b32_img"][:, :8], arrays["b32_txt"][:, :8]
    np.savez(npz, **arrays)
    with pytest.raises(BadInput, match=rf"Dimension mismatch between shards: {re.escape(str(npz))}"):
        DataCompSource(tmp_path / "dc")


def test_datacomp_dim_mismatch_image_vs_text(tmp_path, rng):
    make_datacomp(tmp_path / "dc", rng)
    npz = sorted((tmp_path / "dc").glob("*.npz"))[0]
    arrays = dict(np.load(npz))
    arrays["b32_txt"] = arrays["b32_txt"][:, :8]
    np.savez(npz, **arrays)
    with pytest.raises(BadInput, match=rf"image and text.*{re.escape(str(npz))}\[b32_img\] has dim 16"):
        DataCompSource(tmp_path / "dc")


def test_datacomp_corrupt_files(tmp_path, rng):
    make_datacomp(tmp_path / "dc", rng)
    npz = sorted((tmp_path / "dc").glob("*.npz"))[0]
    good = npz.read_bytes()
    npz.write_bytes(b"garbage" * 10)
    with pytest.raises(BadInput, match=rf"Cannot read {re.escape(str(npz))}"):
        DataCompSource(tmp_path / "dc")
    npz.write_bytes(good)
    parquet = sorted((tmp_path / "dc").glob("*.parquet"))[1]
    parquet.write_bytes(b"garbage")
    with pytest.raises(BadInput, match=rf"Cannot read {re.escape(str(parquet))}"):
        DataCompSource(tmp_path / "dc")


def test_datacomp_missing_text_column(tmp_path, rng):
    make_datacomp(tmp_path / "dc", rng)
    parquet = sorted((tmp_path / "dc").glob("*.parquet"))[0]
    pq.write_table(pq.read_table(parquet).drop(["text"]), parquet)
    with pytest.raises(BadInput, match=rf"{re.escape(str(parquet))} has no 'text' column"):
        DataCompSource(tmp_path / "dc")


def test_datacomp_shards_with_different_columns_are_unified(tmp_path, rng):
    """A column only one shard has is NULL in the others; int64 in one shard and float64 in another
    is read as float64 (not cast to int); an all-NULL column takes the other shard's type."""
    make_datacomp(tmp_path / "dc", rng)
    first, second = sorted((tmp_path / "dc").glob("*.parquet"))
    t0, t1 = pq.read_table(first), pq.read_table(second)
    n0, n1 = t0.num_rows, t1.num_rows
    pq.write_table(t0.append_column("note", pa.nulls(n0, pa.null())), first)
    widths = np.linspace(0.25, 0.75, n1)
    t1 = t1.set_column(t1.column_names.index("original_width"), "original_width", pa.array(widths))
    pq.write_table(t1.append_column("aesthetic", pa.array(np.arange(n1, dtype=np.float32)))
                   .append_column("note", pa.array([f"n{i}" for i in range(n1)])), second)
    _, meta, _, _ = collect(DataCompSource(tmp_path / "dc"), 10)
    assert meta.schema.field("original_width").type == pa.float64()
    assert meta.column("original_width").to_pylist()[n0:] == widths.tolist()
    assert meta.column("original_width").to_pylist()[:n0] == [float(w) for w in t0.column("original_width").to_pylist()]
    assert meta.column("aesthetic").to_pylist() == [None] * n0 + list(range(n1))
    assert meta.column("note").to_pylist() == [None] * n0 + [f"n{i}" for i in range(n1)]


def test_datacomp_dictionary_columns_and_name_case_unify(tmp_path, rng):
    """pandas categoricals (dictionary<string>) next to plain strings, and 'Note' next to 'note',
    were one column before the schemas were unified; they stay one column."""
    make_datacomp(tmp_path / "dc", rng)
    first, second = sorted((tmp_path / "dc").glob("*.parquet"))
    t0, t1 = pq.read_table(first), pq.read_table(second)
    t0 = t0.set_column(t0.column_names.index("text"), "text", pc.dictionary_encode(t0.column("text")))
    pq.write_table(t0.append_column("Note", pa.array(["a"] * t0.num_rows)), first)
    pq.write_table(t1.append_column("note", pa.array(["b"] * t1.num_rows)), second)
    _, meta, _, _ = collect(DataCompSource(tmp_path / "dc"), 10)
    assert meta.column("caption").type == pa.string()
    assert meta.column("caption").to_pylist()[: t0.num_rows] == t0.column("text").to_pylist()
    assert "note" not in meta.column_names
    assert meta.column("Note").to_pylist() == ["a"] * t0.num_rows + ["b"] * t1.num_rows


def test_datacomp_incompatible_column_types_name_both_files(tmp_path, rng):
    make_datacomp(tmp_path / "dc", rng)
    first, second = sorted((tmp_path / "dc").glob("*.parquet"))
    t1 = pq.read_table(second)
    col = t1.column_names.index("original_width")
    pq.write_table(t1.set_column(col, "original_width", pa.array(["w"] * t1.num_rows)), second)
    with pytest.raises(BadInput, match=rf"'original_width' is string in {re.escape(str(second))} but "
                                       rf"int64 in {re.escape(str(first))}"):
        DataCompSource(tmp_path / "dc")


def test_source_columns_named_like_index_columns_are_kept_with_a_suffix(tmp_path, rng):
    make_clip_retrieval(tmp_path / "cr", rng, sizes=(5,))
    path = tmp_path / "cr" / "metadata" / "metadata_00.parquet"
    pq.write_table(pq.read_table(path).append_column("VEC_ID", pa.array([7] * 5)), path)
    _, meta, _, _ = collect(ClipRetrievalSource(tmp_path / "cr"), 10)
    assert "VEC_ID_source" in meta.column_names and "VEC_ID" not in meta.column_names
    assert meta.column("VEC_ID_source").to_pylist() == [7] * 5


def test_datacomp_bad_parameters(tmp_path, rng):
    make_datacomp(tmp_path / "dc", rng)
    with pytest.raises(InvalidParameter, match="arch"):
        DataCompSource(tmp_path / "dc", arch="h14")
    with pytest.raises(InvalidParameter, match="logit_scale"):
        DataCompSource(tmp_path / "dc", logit_scale=0.0)
    with pytest.raises(InvalidParameter, match="batch_size"):
        next(DataCompSource(tmp_path / "dc").batches(0))


# ------------------------------------------------------------------------------------- clip-retrieval


def test_clip_retrieval_reads_everything(tmp_path, rng):
    exp = make_clip_retrieval(tmp_path / "cr", rng)
    src = ClipRetrievalSource(tmp_path / "cr", logit_scale=50.0)
    assert src.info.n == sum(SIZES) and src.info.dim == 16 and not src.info.raw_known
    assert src.info.source == "clip-retrieval" and src.info.logit_scale == 50.0

    batches, meta, image, text = collect(src, 10)
    assert meta.column_names == ["uid", "caption", "image_path", "url"]
    assert meta.column("caption").to_pylist() == exp["caption"]
    np.testing.assert_array_equal(image, exp["image"])
    np.testing.assert_array_equal(text, exp["text"])
    uids = meta.column("uid").to_pylist()
    assert all(HEX32.match(u) for u in uids) and len(set(uids)) == len(uids)
    assert uids == [md5_uid(p) for p in exp["image_path"]]  # derived from image_path
    assert [len(b.meta) for b in batches] == [10, 10, 10, 7, 10, 10, 3]
    meta_files = [tmp_path / "cr" / "metadata" / f"metadata_{s:02d}.parquet" for s in range(2)]
    assert [(Path(b.origin), b.row_offset) for b in batches] == (
        [(meta_files[0], o) for o in (0, 10, 20, 30)] + [(meta_files[1], o) for o in (0, 10, 20)])
    # deterministic: a second source over the same folder derives the same uids
    _, meta2, _, _ = collect(ClipRetrievalSource(tmp_path / "cr"), 7)
    assert meta2.column("uid").to_pylist() == uids


def test_clip_retrieval_numeric_shard_order(tmp_path, rng):
    """Shards 2 and 10 are read as 2, 10 (numeric), not "10" < "2" (lexicographic)."""
    root = tmp_path / "cr"
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True)
    for i in (10, 2):
        np.save(root / "img_emb" / f"img_emb_{i}.npy", unit_f16(rng, 3, 8))
        np.save(root / "text_emb" / f"text_emb_{i}.npy", unit_f16(rng, 3, 8))
        pq.write_table(pa.table({"caption": [f"shard {i}"] * 3}), root / "metadata" / f"metadata_{i}.parquet")
    _, meta, _, _ = collect(ClipRetrievalSource(root), 100)
    assert meta.column("caption").to_pylist() == ["shard 2"] * 3 + ["shard 10"] * 3
    uids = meta.column("uid").to_pylist()  # no image_path/url: md5 of f"{shard}:{row}"
    assert uids[:2] == [md5_uid("2:0"), md5_uid("2:1")] and uids[3] == md5_uid("10:0")


def test_clip_retrieval_duplicate_paths_get_unique_uids(tmp_path, rng):
    make_clip_retrieval(tmp_path / "cr", rng, sizes=(4,))
    path = tmp_path / "cr" / "metadata" / "metadata_00.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(0, "image_path", pa.array(["a.jpg", "b.jpg", "a.jpg", "a.jpg"])), path)
    _, meta, _, _ = collect(ClipRetrievalSource(tmp_path / "cr"), 10)
    uids = meta.column("uid").to_pylist()
    assert uids[0] == md5_uid("a.jpg") and uids[1] == md5_uid("b.jpg")
    assert uids[2] == md5_uid("a.jpg#1") and uids[3] == md5_uid("a.jpg#2")


def test_clip_retrieval_uid_column(tmp_path, rng):
    make_clip_retrieval(tmp_path / "cr", rng)
    given = []
    for s, n in enumerate(SIZES):
        path = tmp_path / "cr" / "metadata" / f"metadata_{s:02d}.parquet"
        uids = hex_uids(rng, n)
        given += uids
        pq.write_table(pq.read_table(path).append_column("key", pa.array(uids)), path)
    _, meta, _, _ = collect(ClipRetrievalSource(tmp_path / "cr", uid_column="key"), 10)
    assert meta.column("uid").to_pylist() == given and "key" not in meta.column_names
    with pytest.raises(BadInput, match="has no 'nope' column"):
        ClipRetrievalSource(tmp_path / "cr", uid_column="nope")


def test_clip_retrieval_missing_dir(tmp_path):
    with pytest.raises(BadInput, match=re.escape(str(tmp_path / "nope"))):
        ClipRetrievalSource(tmp_path / "nope")


def test_clip_retrieval_no_shards(tmp_path):
    (tmp_path / "cr" / "img_emb").mkdir(parents=True)
    with pytest.raises(BadInput, match=rf"No clip-retrieval shards found in {re.escape(str(tmp_path))}"):
        ClipRetrievalSource(tmp_path / "cr")


def test_clip_retrieval_missing_text_shard(tmp_path, rng):
    make_clip_retrieval(tmp_path / "cr", rng)
    missing = tmp_path / "cr" / "text_emb" / "text_emb_01.npy"
    missing.unlink()
    with pytest.raises(BadInput, match=r"Shard 1 is incomplete.*text_emb_1\.npy is missing"):
        ClipRetrievalSource(tmp_path / "cr")


def test_clip_retrieval_missing_metadata(tmp_path, rng):
    make_clip_retrieval(tmp_path / "cr", rng)
    (tmp_path / "cr" / "metadata" / "metadata_00.parquet").unlink()
    with pytest.raises(BadInput, match=r"img_emb_00\.npy exists but .*metadata_0\.parquet is missing"):
        ClipRetrievalSource(tmp_path / "cr")


def test_clip_retrieval_row_count_mismatch(tmp_path, rng):
    make_clip_retrieval(tmp_path / "cr", rng)
    npy = tmp_path / "cr" / "img_emb" / "img_emb_01.npy"
    np.save(npy, np.load(npy)[:20])
    with pytest.raises(BadInput) as err:
        ClipRetrievalSource(tmp_path / "cr")
    msg = str(err.value)
    assert "metadata_01.parquet has 23 rows" in msg and f"{npy} has 20" in msg


def test_clip_retrieval_dim_mismatch_between_shards(tmp_path, rng):
    make_clip_retrieval(tmp_path / "cr", rng)
    for kind, sub in (("img", "img_emb"), ("text", "text_emb")):
        npy = tmp_path / "cr" / sub / f"{kind}_emb_01.npy"
        np.save(npy, np.load(npy)[:, :8])
    npy = re.escape(str(tmp_path / "cr" / "img_emb" / "img_emb_01.npy"))
    with pytest.raises(BadInput, match=rf"between shards: {npy} has dim 8"):
        ClipRetrievalSource(tmp_path / "cr")


def test_clip_retrieval_dim_mismatch_image_vs_text(tmp_path, rng):
    make_clip_retrieval(tmp_path / "cr", rng)
    npy = tmp_path / "cr" / "text_emb" / "text_emb_00.npy"
    np.save(npy, np.load(npy)[:, :12])
    with pytest.raises(BadInput, match=rf"image and text.*{re.escape(str(npy))} has dim 12"):
        ClipRetrievalSource(tmp_path / "cr")


def test_clip_retrieval_corrupt_and_truncated_npy(tmp_path, rng):
    make_clip_retrieval(tmp_path / "cr", rng)
    npy = tmp_path / "cr" / "img_emb" / "img_emb_00.npy"
    data = npy.read_bytes()
    npy.write_bytes(data[:-40])
    with pytest.raises(BadInput, match=rf"Cannot read {re.escape(str(npy))}: file is truncated"):
        ClipRetrievalSource(tmp_path / "cr")
    npy.write_bytes(b"\x00" * 200)
    with pytest.raises(BadInput, match=rf"Cannot read {re.escape(str(npy))}"):
        ClipRetrievalSource(tmp_path / "cr")


def test_clip_retrieval_missing_caption_column(tmp_path, rng):
    make_clip_retrieval(tmp_path / "cr", rng)
    with pytest.raises(BadInput, match=r"metadata_00\.parquet has no 'text' column; columns: image_path"):
        ClipRetrievalSource(tmp_path / "cr", caption_column="text")


# ------------------------------------------------------------------------------------------- helpers


def test_uid_helpers():
    d = UidDeriver()
    assert [d("k"), d("j"), d("k")] == [md5_uid("k"), md5_uid("j"), md5_uid("k#1")]
    out = normalize_uids(pa.array(["AB" * 16, " " + "0f" * 16]), "f.parquet")
    assert out.to_pylist() == ["ab" * 16, "0f" * 16]
    with pytest.raises(BadInput, match=r"f\.parquet row 11: uid None"):
        normalize_uids(pa.array(["ab" * 16, None]), "f.parquet", row_offset=10)


@pytest.mark.parametrize("column,other", [("uid", "UID"), ("text", "Text"), ("url", "URL")])
@pytest.mark.parametrize("shard", [0, 1])
def test_datacomp_columns_differing_only_in_case_name_the_file(tmp_path, rng, column, other, shard):
    """``uid`` next to ``UID`` in one file is an error naming the file, not a KeyError traceback (or a
    vague schema message)."""
    make_datacomp(tmp_path / "dc", rng)
    parquet = sorted((tmp_path / "dc").glob("*.parquet"))[shard]
    t = pq.read_table(parquet)
    pq.write_table(t.append_column(other, t.column(column)), parquet)
    with pytest.raises(BadInput, match=rf"^{re.escape(str(parquet))} has two columns '{column}' and "
                                       rf"'{other}' \(names that differ only in case\)"):
        collect(DataCompSource(tmp_path / "dc"), 10)


def test_datacomp_caption_bytes_that_are_not_utf8_name_file_column_and_row(tmp_path, rng):
    """A binary ``text`` column with invalid UTF-8 is an error naming file, column and row, not an
    ArrowInvalid traceback mid-build."""
    make_datacomp(tmp_path / "dc", rng)
    for parquet in sorted((tmp_path / "dc").glob("*.parquet")):  # binary in every shard
        t = pq.read_table(parquet)
        values = [s.encode() for s in t.column("text").to_pylist()]
        if parquet.stem.endswith("1"):
            values[7] = b"caption \xff\xfe broken"
        pq.write_table(t.set_column(t.column_names.index("text"), "text", pa.array(values, pa.binary())), parquet)
    bad = sorted((tmp_path / "dc").glob("*.parquet"))[1]
    with pytest.raises(BadInput, match=rf"^{re.escape(str(bad))} row 7: column 'text' holds bytes that are not "
                                       "valid UTF-8"):
        collect(DataCompSource(tmp_path / "dc"), 10)


def test_datacomp_valid_utf8_bytes_are_read_as_captions(tmp_path, rng):
    expected = make_datacomp(tmp_path / "dc", rng)
    for parquet in sorted((tmp_path / "dc").glob("*.parquet")):
        t = pq.read_table(parquet)
        values = [s.encode() for s in t.column("text").to_pylist()]
        pq.write_table(t.set_column(t.column_names.index("text"), "text", pa.array(values, pa.binary())), parquet)
    _, meta, _, _ = collect(DataCompSource(tmp_path / "dc"), 10)
    assert meta.column("caption").to_pylist() == expected["text"]


def test_build_index_cli_reports_hostile_datacomp_inputs_in_one_line(tmp_path, rng):
    from click.testing import CliRunner

    from clip_density_index import cli

    make_datacomp(tmp_path / "dc", rng)
    parquet = sorted((tmp_path / "dc").glob("*.parquet"))[0]
    t = pq.read_table(parquet)
    pq.write_table(t.append_column("UID", t.column("uid")), parquet)
    r = CliRunner().invoke(cli.cli, ["build-index", "--source", "datacomp", "--input", str(tmp_path / "dc"),
                                     "--out", str(tmp_path / "idx")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"Error: {parquet} has two columns 'uid' and 'UID'" in r.output, r.output

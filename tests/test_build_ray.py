"""build_index on an engine (indexer.parallel): parts read by tasks, FAISS lists filled by tasks and
merged. The index equals the local build: the same embeddings, raw norms, catalog rows and FAISS
search results, the statistics to floating-point rounding. On a real local Ray cluster; a worker
killed mid-build costs only its part. An open_clip source is encoded by Ray Data actors, one model
each; an actor killed mid-part costs only that part."""

import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, clustered_pairs
from clip_density_index.indexer import faiss_index, parallel
from clip_density_index.indexer.build import build_index
from clip_density_index.indexer.embed import OpenClipSource
from clip_density_index.indexer.engine import LocalEngine
from clip_density_index.indexer.errors import BadInput
from clip_density_index.indexer.pool import open_index
from clip_density_index.indexer.reader import ClipRetrievalSource, DataCompSource
from clip_density_index.indexer.synthetic import BLOCK_SIZE, SyntheticSource

STATS = ("mean", "sum", "cov", "raw_mean", "raw_cov", "whiten_mean", "whiten", "whiten_logdet", "cov_rows")


class Shuffled(LocalEngine):
    """Runs every task in this process and hands the results back in a shuffled order: what the
    driver sees from a cluster, without one."""

    name = "shuffled"

    def map(self, task, items, shared=None, **resources):
        done = [(item, task(item, shared)) for item in items]
        random.Random(len(done)).shuffle(done)
        yield from done


class DiesOnce(SyntheticSource):
    """Kills the worker that reads part 1, the first time (a marker file remembers)."""

    def __init__(self, marker: Path, **kwargs):
        super().__init__(**kwargs)
        self.marker = str(marker)

    def read_part(self, part, batch_size):
        if part.index == 1 and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        yield from super().read_part(part, batch_size)


def rows(path: Path, sql: str) -> list:
    with duckdb.connect(str(path / "catalog.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


def assert_same_index(a: Path, b: Path, stats=STATS) -> None:
    """``b`` is the index ``a`` is: arrays and catalog rows equal, ``stats`` to rounding, FAISS
    answers equal."""
    for name in ("image_emb.npy", "text_emb.npy", "image_rawnorm.npy", "text_rawnorm.npy"):
        if (a / name).exists() or (b / name).exists():
            np.testing.assert_array_equal(np.load(b / name), np.load(a / name), err_msg=name)
    assert rows(b, "SELECT * FROM samples ORDER BY vec_id") == rows(a, "SELECT * FROM samples ORDER BY vec_id")
    manifest = "SELECT * EXCLUDE (created_at) FROM manifest"
    assert rows(b, manifest) == rows(a, manifest)
    with open_index(a) as pa_, open_index(b) as pb:
        for m in ("image", "text"):
            for name in stats:
                if pa_.raw_known or not name.startswith("raw"):
                    want = pa_.stat(m, name)  # float32 products summed in another order: rounding apart
                    np.testing.assert_allclose(pb.stat(m, name), want, rtol=1e-5, atol=1e-6 * np.abs(want).max(),
                                               err_msg=f"{m} {name}")
            queries = np.asarray(pa_.embeddings("text" if m == "image" else "image")[:50], np.float32)
            sa, ia = faiss_index.search(pa_.faiss(m), queries, 10, nprobe=4)
            sb, ib = faiss_index.search(pb.faiss(m), queries, 10, nprobe=4)
            np.testing.assert_array_equal(ib, ia)
            np.testing.assert_array_equal(sb, sa)


def synthetic(n: int, **kwargs) -> SyntheticSource:
    return SyntheticSource(n=n, dim=16, **kwargs)


N = 3 * BLOCK_SIZE + 500  # four parts, the last one short


# -- the driver's side, on an engine that runs in this process ----------------------------------------
def test_parts_returned_in_any_order_give_the_local_index(tmp_path):
    key = dict(index_key="IVF16,Flat", cov_sample=5000)  # a covariance subset: drawn where each part sits
    build_index(synthetic(N), tmp_path / "local", **key)
    report = build_index(synthetic(N), tmp_path / "parts", engine=Shuffled(), **key)
    assert report.engine == "shuffled" and report.n == N
    assert_same_index(tmp_path / "local", tmp_path / "parts")


def test_a_limit_cuts_the_last_part_and_its_statistics(tmp_path):
    image, text = clustered_pairs(N, 16)
    limit = BLOCK_SIZE + 1000  # inside the second part

    def source(root):
        return datacomp(root, image, text, sizes=(BLOCK_SIZE, BLOCK_SIZE, N - 2 * BLOCK_SIZE))

    build_index(source(tmp_path / "in"), tmp_path / "local", limit=limit, cov_sample=3000)
    report = build_index(source(tmp_path / "in"), tmp_path / "parts", limit=limit, cov_sample=3000,
                         engine=Shuffled())
    assert report.n == limit
    assert_same_index(tmp_path / "local", tmp_path / "parts")


def test_clip_retrieval_uids_derived_across_parts(tmp_path):
    """An image_path repeated in a later shard gets the uid of a repeat (md5 of 'key#1'), as when
    the shards are read in one pass."""
    src = clip_retrieval(tmp_path / "cr", np.random.default_rng(0), sizes=(30, 20, 25))
    build_index(ClipRetrievalSource(src), tmp_path / "local")
    build_index(ClipRetrievalSource(src), tmp_path / "parts", engine=Shuffled())
    assert_same_index(tmp_path / "local", tmp_path / "parts")
    uids = rows(tmp_path / "parts", "SELECT count(DISTINCT uid), count(*) FROM samples")
    assert uids == [(75, 75)]


def test_a_bad_row_in_a_part_is_named(tmp_path):
    image, text = clustered_pairs(300, 16)
    text[250, 3] = np.nan  # the second shard's row 50
    with pytest.raises(BadInput, match=r"00000000000000000000000000000001\.parquet, row 50: text embedding "
                                       r"contains NaN"):
        build_index(datacomp(tmp_path / "dc", image, text, sizes=(200, 100)), tmp_path / "idx", engine=Shuffled())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dc"]


def test_parts_of_each_source_cover_the_pool():
    src = synthetic(N)
    parts = src.parts()
    assert [p.start for p in parts] == list(range(0, N, BLOCK_SIZE))
    assert sum(p.rows for p in parts) == N and parts[-1].rows == 500
    whole = np.concatenate([b.image for b in src.batches(1000)])
    read = np.concatenate([b.image for p in parts for b in src.read_part(p, 1000)])
    np.testing.assert_array_equal(read, whole)


# -- a real local Ray cluster ----------------------------------------------------------------------------
def test_ray_build_equals_local_build(tmp_path, ray_engine):
    key = dict(index_key="IVF16,Flat", cov_sample=5000)
    build_index(synthetic(N), tmp_path / "local", **key)
    report = build_index(synthetic(N), tmp_path / "ray", engine=ray_engine, **key)
    assert report.engine == "ray"
    assert_same_index(tmp_path / "local", tmp_path / "ray")
    for m in ("image", "text"):  # the merged lists are the lists of one index filled in order
        assert (tmp_path / "ray" / f"{m}.faiss").read_bytes() == (tmp_path / "local" / f"{m}.faiss").read_bytes()


def test_a_killed_worker_costs_only_its_part(tmp_path, ray_engine):
    build_index(synthetic(N), tmp_path / "local", index_key="IVF16,Flat")
    marker = tmp_path / "died"
    report = build_index(DiesOnce(marker, n=N, dim=16), tmp_path / "ray", index_key="IVF16,Flat",
                         engine=ray_engine)
    assert marker.exists()  # a worker was killed reading part 1; its retry read it again
    assert report.n == N
    assert_same_index(tmp_path / "local", tmp_path / "ray")


def test_ray_build_of_shards_equals_local_build(tmp_path, ray_engine):
    image, text = clustered_pairs(700, 16)
    build_index(datacomp(tmp_path / "dc", image, text, sizes=(300, 250, 150)), tmp_path / "local")
    build_index(datacomp(tmp_path / "dc", image, text, sizes=(300, 250, 150)), tmp_path / "ray",
                engine=ray_engine)
    assert_same_index(tmp_path / "local", tmp_path / "ray")


def test_a_bad_row_on_a_worker_is_one_line(tmp_path, ray_engine):
    image, text = clustered_pairs(300, 16)
    image[120, 0] = np.inf
    with pytest.raises(BadInput) as err:
        build_index(datacomp(tmp_path / "dc", image, text, sizes=(100, 200)), tmp_path / "idx",
                    engine=ray_engine)
    assert str(err.value).endswith("00000000000000000000000000000001.parquet, row 20: image embedding "
                                   "contains NaN or inf")
    assert "\n" not in str(err.value)


class Watched(OpenClipSource):
    """An open_clip source that leaves files in ``folder``: ``loaded-PID-*`` each time it is
    unpickled (the model loaded by an actor) and ``part-I-PID`` for each part read; the process that
    reads part ``die_on`` is killed the first time (a marker file remembers)."""

    def __init__(self, folder: Path, *args, die_on: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.folder, self.die_on = str(folder), die_on

    def __setstate__(self, state):
        self.__dict__.update(state)
        (Path(self.folder) / f"loaded-{os.getpid()}-{uuid.uuid4().hex}").write_text("")

    def read_part(self, part, batch_size):
        folder = Path(self.folder)
        if part.index == self.die_on and not (folder / "died").exists():
            (folder / "died").write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        (folder / f"part-{part.index}-{os.getpid()}").write_text("")
        yield from super().read_part(part, batch_size)


@pytest.fixture
def encoded(tmp_path, monkeypatch):
    """``(source(**kwargs), local index)``: a .tar shard of 11 images (sample 6 unreadable,
    skipped) encoded by a random tiny model (no checkpoint to find: the model goes to the actors
    with the source) in batches of 2 samples, listed in parts of 3 samples rounded up to 4 (whole
    batches); the local build made from it."""
    open_clip = pytest.importorskip("open_clip")
    import clip_density_index.indexer.embed as embed

    tiny = tiny_open_clip(tmp_path / "configs", open_clip)
    shard = webdataset(tmp_path / "shard.tar", 11, broken=6)
    monkeypatch.setattr(embed, "PART_SAMPLES", 3)  # parts are listed on the driver
    (tmp_path / "marks").mkdir()

    def source(**kwargs):
        return Watched(tmp_path / "marks", shard, None, model="cdi-tiny-ray-test", pretrained=None, skip_bad=True,
                       device="cpu", bundle=tiny, batch_size=2, **kwargs)

    local = build_index(source(), tmp_path / "local")
    assert (local.n, local.skipped) == (10, 1)
    return source, tmp_path / "local"


def assert_same_encoding(a: Path, b: Path) -> None:
    """``b`` is the index of ``a``'s encoding: the same skipped samples, samples, embeddings and raw
    norms (byte for byte), the statistics to rounding (whitening aside)."""
    def skipped(index):  # paths and the start of their reason (PIL's message names an object's address)
        return [line.split(":", 3)[:3] for line in (index / "skipped.tsv").read_text().splitlines()]

    assert skipped(b) == skipped(a) and len(skipped(a)) == 2
    # 10 samples in 32 dimensions: a singular covariance, whose whitening magnifies rounding
    assert_same_index(a, b, stats=[s for s in STATS if not s.startswith("whiten")])


def test_open_clip_parts_encoded_on_actors_equal_the_local_encoding(tmp_path, ray_engine, encoded):
    """Three parts read by Ray Data actors that unpickle the source, and its model, once each."""
    source, local = encoded
    report = build_index(source(), tmp_path / "ray", engine=ray_engine)
    assert (report.n, report.skipped) == (10, 1)
    assert_same_encoding(local, tmp_path / "ray")
    marks = tmp_path / "marks"
    loaded = [p.name.split("-")[1] for p in marks.glob("loaded-*")]
    parts = sorted((int(p.name.split("-")[1]), p.name.split("-")[2]) for p in marks.glob("part-*"))
    assert [i for i, _ in parts] == [0, 1, 2]  # each part read once
    assert len(set(loaded)) == len(loaded) <= 2  # one model per actor (2 CPUs: 2 actors), not one per part
    assert {pid for _, pid in parts} <= set(loaded)


def test_a_killed_actor_costs_only_its_part(tmp_path, ray_engine, encoded):
    source, local = encoded
    report = build_index(source(die_on=1), tmp_path / "ray", engine=ray_engine)
    marks = tmp_path / "marks"
    assert (marks / "died").exists()  # the actor reading part 1 was killed; restarted, it read part 1 again
    assert sorted(int(p.name.split("-")[1]) for p in marks.glob("part-*")) == [0, 1, 2]
    assert (report.n, report.skipped) == (10, 1)  # nothing counted twice
    assert_same_encoding(local, tmp_path / "ray")


def test_cli_engine_options(tmp_path):
    pytest.importorskip("ray")
    cli = [sys.executable, str(ROOT / "cli.py"), "build-index", "--n", "300", "--dim", "16", "-q"]
    r = subprocess.run(cli + ["--out", tmp_path / "a", "--address", "auto"], capture_output=True, text=True)
    assert r.returncode == 1 and "Error: --address needs --engine ray" in r.stderr
    assert not (tmp_path / "a").exists()
    r = subprocess.run(cli + ["--out", tmp_path / "b", "--engine", "ray"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert open_index(tmp_path / "b").n == 300


# -- inputs ------------------------------------------------------------------------------------------------
def datacomp(root: Path, image: np.ndarray, text: np.ndarray, sizes) -> DataCompSource:
    """DataComp shards holding ``image`` / ``text`` (float16) in shards of ``sizes`` rows."""
    root.mkdir(parents=True, exist_ok=True)
    at = 0
    for s, n in enumerate(sizes):
        rows_ = slice(at, at + n)
        ids = [f"{i:032x}" for i in range(at, at + n)]
        pq.write_table(pa.table({"uid": ids, "text": [f"caption {i}" for i in range(at, at + n)]}),
                       root / f"{s:032x}.parquet")
        np.savez(root / f"{s:032x}.npz", b32_img=image[rows_].astype(np.float16),
                 b32_txt=text[rows_].astype(np.float16))
        at += n
    return DataCompSource(root)


def clip_retrieval(root: Path, rng: np.random.Generator, sizes) -> Path:
    """clip-retrieval shards whose image paths repeat across shards (shard s, row i: image i)."""
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for s, n in enumerate(sizes):
        np.save(root / "img_emb" / f"img_emb_{s}.npy", rng.standard_normal((n, 16)).astype(np.float32))
        np.save(root / "text_emb" / f"text_emb_{s}.npy", rng.standard_normal((n, 16)).astype(np.float32))
        pq.write_table(pa.table({"image_path": [f"/images/{i}.jpg" for i in range(n)],
                                 "caption": [f"shard {s} row {i}" for i in range(n)]}),
                       root / "metadata" / f"metadata_{s}.parquet")
    return root


def test_fill_lists_refuses_an_embeddings_file_it_cannot_see(tmp_path):
    with pytest.raises(BadInput, match="not visible on this worker"):
        parallel.fill_lists((0, 10), (np.zeros(1, np.uint8), str(tmp_path / "image_emb.npy")))


def tiny_open_clip(configs: Path, open_clip):
    """A tiny randomly initialised open_clip model (a registered config), as load_model returns it."""
    import torch

    from clip_density_index.indexer.embed import ModelBundle

    configs.mkdir()
    (configs / "cdi-tiny-ray-test.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(configs)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("cdi-tiny-ray-test")
    return ModelBundle(model.eval(), preprocess, open_clip.get_tokenizer("cdi-tiny-ray-test"))


def webdataset(path: Path, n: int, broken: int) -> Path:
    """A .tar shard of ``n`` samples (an image and a caption each); sample ``broken`` has bytes that
    are no image."""
    from PIL import Image

    with tarfile.open(path, "w") as tf:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (40 + 3 * i, 36), ((40 * i) % 256, (90 * i) % 256, 120)).save(buf, format="PNG")
            image = b"no image here" if i == broken else buf.getvalue()
            for name, data in ((f"{i:04d}.png", image), (f"{i:04d}.txt", f"sample {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path

"""The builder: arrays in, a complete index directory out; bad input; write-aside-then-swap."""

import contextlib
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import clustered_pairs
from clip_density_index.indexer import faiss_index
from clip_density_index.indexer.build import build_index
from clip_density_index.indexer.errors import BadInput, InvalidParameter
from clip_density_index.indexer.pool import open_index
from clip_density_index.indexer.sources import ArraySource


@contextlib.contextmanager
def catalog_held(catalog, read_only: bool, seconds: float):
    """Another process that holds ``catalog`` open (for reading or writing) for ``seconds``."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1], read_only=sys.argv[2] "
         "== 'r'); print('ready', flush=True); time.sleep(float(sys.argv[3]))", str(catalog),
         "r" if read_only else "w", str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def make(n=600, d=16, seed=0, **kw):
    image, text = clustered_pairs(n, d, seed)
    return ArraySource(image, text, **kw), image, text


def test_build_stores_normalised_embeddings_norms_metadata_and_stats(tmp_path):
    src, image, text = make(meta={"url": [f"http://x/{i}" for i in range(600)]})
    report = build_index(src, tmp_path / "idx", batch_size=128)
    assert report.n == 600 and report.dim == 16
    pool = open_index(tmp_path / "idx")
    for m, raw in (("image", image), ("text", text)):
        raw = raw.astype(np.float64)
        norms = np.linalg.norm(raw, axis=1)
        v = raw / norms[:, None]
        np.testing.assert_allclose(pool.embeddings(m), v, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(pool.raw_norms(m), norms, rtol=1e-6)
        np.testing.assert_allclose(pool.stat(m, "mean"), v.mean(0), atol=1e-6)
        np.testing.assert_allclose(pool.stat(m, "sum"), v.sum(0), atol=1e-4)
        np.testing.assert_allclose(pool.stat(m, "cov"), np.cov(v, rowvar=False, ddof=1), atol=1e-6)
        np.testing.assert_allclose(pool.stat(m, "raw_mean"), raw.mean(0), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(pool.stat(m, "raw_cov"), np.cov(raw, rowvar=False), rtol=1e-4, atol=1e-3)
    with pool.store() as s:
        rows = list(s.query("SELECT vec_id, uid, caption, url FROM samples ORDER BY vec_id"))
    assert [r["vec_id"] for r in rows] == list(range(600))
    assert rows[5]["uid"] == src.meta.column("uid")[5].as_py() and rows[5]["url"] == "http://x/5"
    assert pool.n == 600 and pool.dim == 16 and pool.logit_scale == 100.0 and not pool.synthetic
    assert pool.manifest["image_index"] == "Flat"


def test_faiss_ids_are_vec_ids(tmp_path):
    src, image, text = make()
    build_index(src, tmp_path / "idx")
    pool = open_index(tmp_path / "idx")
    q = np.asarray(pool.embeddings("text")[:5], dtype=np.float32)
    scores, ids = faiss_index.search(pool.faiss("image"), q, 10)
    exact = q @ np.asarray(pool.embeddings("image")).T
    np.testing.assert_array_equal(ids, np.argsort(-exact, axis=1)[:, :10])


def test_flat_index_is_made_from_the_embeddings_not_written(tmp_path):
    """An exact index has no .faiss file (it would be a second copy of the embeddings)."""
    src, image, text = make()
    build_index(src, tmp_path / "flat")
    build_index(make()[0], tmp_path / "ivf", index_key="IVF4,Flat")
    assert not list((tmp_path / "flat").glob("*.faiss"))
    assert sorted(p.name for p in (tmp_path / "ivf").glob("*.faiss")) == ["image.faiss", "text.faiss"]
    pool = open_index(tmp_path / "flat")
    assert pool.manifest["index_params"]["image"]["file"] is None
    assert pool.faiss("text").ntotal == 600 and pool.manifest["index_params"]["text"]["ntotal"] == 600


def test_covariance_subset_on_large_pools(tmp_path):
    """``cov_sample``: covariances from a seeded subset of about that many rows; means exact."""
    src, image, text = make(n=3000)
    build_index(src, tmp_path / "sub", cov_sample=600, batch_size=512)
    build_index(make(n=3000)[0], tmp_path / "all", cov_sample=0)
    sub, full = open_index(tmp_path / "sub"), open_index(tmp_path / "all")
    assert 450 < sub.stat("image", "cov_rows") < 750 and full.stat("image", "cov_rows") == 3000
    v = text / np.linalg.norm(text, axis=1, keepdims=True)
    np.testing.assert_allclose(sub.stat("text", "mean"), v.mean(0), atol=1e-6)
    np.testing.assert_allclose(full.stat("text", "cov"), np.cov(v, rowvar=False), atol=1e-6)
    err = np.linalg.norm(sub.stat("text", "cov") - full.stat("text", "cov")) / np.linalg.norm(full.stat("text", "cov"))
    assert 0 < err < 0.2
    with pytest.raises(InvalidParameter, match="cov_sample"):
        build_index(make()[0], tmp_path / "bad", cov_sample=1)


def test_float16_storage(tmp_path):
    src, image, _ = make()
    build_index(src, tmp_path / "idx", dtype="float16")
    emb = open_index(tmp_path / "idx").embeddings("image")
    assert emb.dtype == np.float16
    v = image / np.linalg.norm(image, axis=1, keepdims=True)
    np.testing.assert_allclose(emb.astype(np.float32), v, atol=2e-3)


def test_index_factory_override_and_limit(tmp_path):
    src, *_ = make(n=2000)
    report = build_index(src, tmp_path / "idx", index_key="IVF16,Flat", limit=1500)
    pool = open_index(tmp_path / "idx")
    assert report.n == 1500 and pool.n == 1500
    assert pool.manifest["text_index"] == "IVF16,Flat"
    assert pool.faiss("text").ntotal == 1500


@pytest.mark.parametrize("key, where", [
    (None, "_insert_stats"),  # Flat: every array written, catalog not finished
    ("IVF8,Flat", "faiss"),  # interrupted while building the FAISS index
])
def test_rebuild_replaces_and_interrupted_build_keeps_old_index(tmp_path, monkeypatch, key, where):
    import clip_density_index.indexer.build as build_module

    out = tmp_path / "idx"
    build_index(make(n=300)[0], out)
    assert open_index(out).n == 300

    def boom(*a, **k):
        raise KeyboardInterrupt

    if where == "faiss":
        monkeypatch.setattr(faiss_index, "build_index", boom)
    else:
        monkeypatch.setattr(build_module, where, boom)
    with pytest.raises(KeyboardInterrupt):
        build_index(make(n=500, seed=1)[0], out, index_key=key)
    pool = open_index(out)  # the old index is still there and usable
    assert pool.n == 300 and pool.faiss("image").ntotal == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # nothing half-written left
    monkeypatch.undo()
    assert build_index(make(n=500, seed=1)[0], out).replaced
    assert open_index(out).n == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_rebuild_refuses_while_the_index_is_in_use(tmp_path, monkeypatch, caplog):
    """A running score holds a shared lock (indexer.lock.using): a rebuild refuses before it starts;
    a score that began during the build is waited for at the swap (both succeed)."""
    import threading

    import clip_density_index.indexer.build as build_module
    from clip_density_index.indexer import lock
    from clip_density_index.indexer.errors import IndexBusy

    out = tmp_path / "idx"
    build_index(make(n=300)[0], out)
    with lock.using(out, "score"):
        with pytest.raises(IndexBusy, match="in use by another process"):
            build_index(make(n=500, seed=1)[0], out)
    real = build_module._insert_stats
    seen = []

    def score_starts_meanwhile(*a, **k):
        held = lock.using(out, "score")
        held.__enter__()

        def score_finishes():
            seen.append(open_index(out).n)  # the old index, still in place while the score runs
            held.__exit__(None, None, None)

        threading.Timer(0.5, score_finishes).start()
        return real(*a, **k)

    monkeypatch.setattr(build_module, "_insert_stats", score_starts_meanwhile)
    with caplog.at_level("WARNING", logger="clip_density_index.indexer.lock"):
        assert build_index(make(n=500, seed=1)[0], out).replaced
    assert "replaces it when that score has finished" in caplog.text
    assert seen == [300] and open_index(out).n == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    with pytest.raises(IndexBusy, match="being replaced"), lock.replacing(out), lock.using(out, "score"):
        pass


def test_rebuild_refuses_to_delete_files_it_did_not_write(tmp_path):
    out = tmp_path / "idx"
    build_index(make(n=300)[0], out)
    (out / "subset.npy").write_bytes(b"mine")
    with pytest.raises(BadInput, match=r"holds files a build did not write \(subset.npy\)"):
        build_index(make(n=500, seed=1)[0], out)
    assert (out / "subset.npy").read_bytes() == b"mine" and open_index(out).n == 300


def test_symlinked_out_replaces_the_target(tmp_path):
    target, link = tmp_path / "disk" / "idx", tmp_path / "idx"
    target.parent.mkdir()
    build_index(make(n=300)[0], target)
    link.symlink_to(target)
    report = build_index(make(n=500, seed=1)[0], link)
    assert report.replaced and report.path == target
    assert link.is_symlink() and open_index(link).n == 500
    assert sorted(p.name for p in target.parent.iterdir()) == ["idx"]  # built and swapped beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "idx"]


def test_refuses_to_replace_a_directory_that_is_not_an_index(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"x")
    with pytest.raises(BadInput, match="not an index"):
        build_index(make()[0], out)
    assert (out / "cat.jpg").exists()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda img, txt, uids: img.__setitem__((7, 3), np.nan), r"arrays, row 7: image embedding contains NaN"),
        (lambda img, txt, uids: txt.__setitem__((9, 0), np.inf), r"arrays, row 9: text embedding contains NaN or inf"),
        (lambda img, txt, uids: img.__setitem__(11, 0.0), r"arrays, row 11: image embedding is all zeros"),
        (lambda img, txt, uids: uids.__setitem__(4, "xyz"), r"arrays, row 4: malformed uid 'xyz'"),
        (lambda img, txt, uids: uids.__setitem__(4, "A" * 32), r"malformed uid"),
        (lambda img, txt, uids: uids.__setitem__(250, uids[3]), r"duplicate uid '.*': arrays, row 3 and arrays, row 250"),
    ],
)
def test_bad_input_is_named_and_leaves_nothing(tmp_path, mutate, message):
    image, text = clustered_pairs(300, 8)
    uids = [f"{i:032x}" for i in range(300)]
    mutate(image, text, uids)
    with pytest.raises(BadInput, match=message):
        build_index(ArraySource(image, text, uids=uids), tmp_path / "idx", batch_size=100)
    assert list(tmp_path.iterdir()) == []


def test_dimension_and_row_mismatch(tmp_path):
    image, text = clustered_pairs(100, 8)
    with pytest.raises(BadInput, match="text embeddings have dimension 6, expected 8"):
        build_index(ArraySource(image, text[:, :6]), tmp_path / "a")
    with pytest.raises(BadInput, match="99 text embeddings but 100 metadata rows"):
        build_index(ArraySource(image, text[:99]), tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_identical_vectors_are_named_as_such(tmp_path):
    image, text = clustered_pairs(100, 8)
    image[:] = image[0]
    with pytest.raises(BadInput, match=r"arrays: the statistics of the image embeddings cannot be computed "
                                       r"\(Covariance is zero"):
        build_index(ArraySource(image, text), tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_bad_parameters(tmp_path):
    src = make()[0]
    with pytest.raises(InvalidParameter, match="float64"):
        build_index(src, tmp_path / "i", dtype="float64")
    with pytest.raises(InvalidParameter, match="NotAnIndex"):
        build_index(src, tmp_path / "i", index_key="NotAnIndex")
    assert list(tmp_path.iterdir()) == []


def test_index_key_is_checked_before_reading_whatever_the_nprobe(tmp_path):
    """Wrapped keys (a rotation, a PCA, an id map) are checked with --nprobe too: unchecked, they
    would score unrotated queries against rotated vectors as if exact."""
    src = make(n=300)[0]

    def unread(batch_size):
        raise AssertionError("the source was read before the key was checked")

    src.batches = unread
    for key in ("RR16,IVF8,Flat", "PCA8,IVF8,Flat", "IDMap,Flat", "IVF8,PQ4x4", "OPQ4,IVF8,PQ4"):
        with pytest.raises(InvalidParameter, match="Unsupported index key"):
            build_index(src, tmp_path / "i", index_key=key, nprobe=4)
    report = build_index(make(n=300)[0], tmp_path / "i", index_key=" IVF8,Flat ")
    assert report.index_keys == {"image": "IVF8,Flat", "text": "IVF8,Flat"}


def test_store_helpers_leave_no_open_result(tmp_path):
    """DuckDB 2.0: a half-read result blocks ``register``; the Store helpers must read fully."""
    import pyarrow as pa

    from clip_density_index.indexer.store import Store

    with Store(tmp_path / "c.duckdb") as s:
        s.migrate()
        assert s.has_table("manifest") and s.schema_version() >= 1
        s.con.register("t", pa.table({"x": [1, 2]}))
        assert s.con.execute("SELECT sum(x) FROM t").fetchall() == [(3,)]


def test_a_damaged_index_is_named_not_a_traceback(tmp_path):
    from clip_density_index.indexer.errors import BrokenIndex

    out = tmp_path / "idx"
    build_index(make(n=300)[0], out, index_key="IVF8,Flat")
    (out / "text.faiss").unlink()
    (out / "image_emb.npy").unlink()
    with pytest.raises(BrokenIndex, match=r"incomplete: image_emb.npy, text.faiss are missing"):
        open_index(out)
    build_index(make(n=300)[0], out, index_key="IVF8,Flat")
    sizes = {}
    for name in ("image.faiss", "text_emb.npy"):  # truncated: found on first use, named
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[: len(data) // 2])
        sizes[name] = (len(data) // 2, len(data))
    cut, full = sizes["image.faiss"]
    with pytest.raises(BrokenIndex, match=rf"image.faiss' has {cut:,} bytes; it had {full:,} when the index was built"):
        open_index(out)  # the sizes recorded at build time: found on open
    import duckdb

    con = duckdb.connect(str(out / "catalog.duckdb"))
    con.execute("DELETE FROM data_files")  # as an index built before files were recorded
    con.close()
    pool = open_index(out)
    with pytest.raises(BrokenIndex, match=r"cannot read image.faiss"):
        pool.faiss("image")
    with pytest.raises(BrokenIndex, match=r"cannot read text_emb.npy"):
        pool.embeddings("text")
    (out / "catalog.duckdb").write_bytes(b"junk" * 100)
    with pytest.raises(BrokenIndex, match=r"Cannot open the catalog .*catalog.duckdb: .*not a valid DuckDB"):
        open_index(out)


@pytest.mark.parametrize("other_reads", [False, True])
def test_a_catalog_another_process_holds_is_reported_busy(tmp_path, other_reads, monkeypatch):
    import clip_density_index.indexer.pool as pool_module
    from clip_density_index.indexer.errors import IndexBusy
    from clip_density_index.indexer.store import Store

    monkeypatch.setattr(pool_module, "READ_WAIT", 0.5)  # a reader waits this long for a writer

    out = tmp_path / "idx"
    build_index(make(n=300)[0], out)
    with catalog_held(out / "catalog.duckdb", other_reads, 60) as holder:
        if other_reads:  # a notebook's kept reader blocks writers only; the message says how to free it
            assert open_index(out).n == 300
            with pytest.raises(IndexBusy, match=rf"open in another process \(PID {holder.pid}\).*pool.close"):
                Store(out / "catalog.duckdb", read_only=False)
        else:
            with pytest.raises(IndexBusy, match=rf"open for writing in another process \(PID {holder.pid}\)"):
                open_index(out)
    assert open_index(out).n == 300


def test_an_open_pool_notices_a_rebuild_and_a_new_one_sees_it(tmp_path):
    """A PoolIndex opened before a rebuild must not mix its arrays with the new catalog (scores
    written into the new index), and a fresh open_index in the same process must not read the
    replaced, deleted catalog while the earlier pool's kept reader is open (DuckDB shares one
    database per path)."""
    from clip_density_index import queries
    from clip_density_index.indexer.errors import IndexReplaced

    out = tmp_path / "idx"
    build_index(make(n=300)[0], out)
    old = open_index(out)
    old.reader()
    old.embeddings("image")
    build_index(make(n=400, seed=1)[0], out)
    for use in (lambda: old.embeddings("image"), old.reader, old.store, lambda: old.faiss("text"),
                lambda: queries.score(old, metrics=["dc"])):
        with pytest.raises(IndexReplaced, match="was rebuilt or removed after it was opened"):
            use()
    fresh = open_index(out)
    assert fresh.n == 400 and fresh.manifest["n"] == 400
    assert list(fresh.reader().query("SELECT count(*) AS c FROM samples")) == [{"c": 400}]
    assert queries.run_sql(fresh, "SELECT count(*) AS c FROM samples").to_pylist() == [{"c": 400}]


@pytest.mark.parametrize("scale", [1e-21, 1e-30, 1e15])
def test_tiny_and_huge_raw_vectors_are_normalised_exactly(tmp_path, scale):
    """float32 norms of 1e-21-scaled vectors are exact, though their float32 squares are subnormal
    (off by 2e-4 if summed as they are)."""
    image, text = clustered_pairs(200, 16)
    build_index(ArraySource(image * np.float32(scale), text), tmp_path / "i")
    pool = open_index(tmp_path / "i")
    emb = np.asarray(pool.embeddings("image"), dtype=np.float64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    want = np.linalg.norm(image.astype(np.float64), axis=1) * scale
    np.testing.assert_allclose(pool.raw_norms("image"), want, rtol=1e-6)


def test_vectors_too_large_for_float32_statistics_are_named(tmp_path):
    image, text = clustered_pairs(200, 16)
    with pytest.raises(BadInput, match=r"image embeddings cannot be computed \(Covariance is not finite"):
        build_index(ArraySource(image * np.float32(1e20), text), tmp_path / "j")  # not a LinAlgError


def test_a_writer_waits_for_a_short_reader_in_another_process(tmp_path):
    from clip_density_index.indexer.errors import IndexBusy
    from clip_density_index.indexer.store import Store

    out = tmp_path / "idx"
    build_index(make(n=300)[0], out)
    with catalog_held(out / "catalog.duckdb", True, 1.5):
        with pytest.raises(IndexBusy):
            Store(out / "catalog.duckdb", read_only=False)
        t0 = time.monotonic()
        with Store(out / "catalog.duckdb", read_only=False, wait=30) as s:  # a score's final write
            assert s.has_table("samples")
        assert 0.2 < time.monotonic() - t0 < 30


def test_a_reader_waits_for_a_short_writer_in_another_process(tmp_path):
    out = tmp_path / "idx"
    build_index(make(n=300)[0], out)
    with catalog_held(out / "catalog.duckdb", False, 1.5):
        t0 = time.monotonic()
        assert open_index(out).n == 300  # a score's final write: `sql` / `query` wait for it
        assert 0.2 < time.monotonic() - t0 < 30


def test_every_earlier_build_is_noticed_even_when_inodes_are_reused(tmp_path):
    """ext4 can give a new build's directory the inode of the one two builds earlier."""
    from clip_density_index.indexer.errors import IndexReplaced

    out = tmp_path / "idx"
    pools = []
    for i in range(6):
        build_index(make(n=300, seed=i)[0], out)
        for old in pools:
            with pytest.raises(IndexReplaced):
                old.check_current()
        pools.append(open_index(out))
    pools[-1].check_current()


def test_a_task_keeps_the_runs_build_open_and_refuses_another(tmp_path):
    """indexer.pool.task_index: the index an engine's worker keeps open for a run's tasks."""
    from clip_density_index.indexer.errors import IndexReplaced
    from clip_density_index.indexer.pool import task_index

    out = tmp_path / "idx"
    build_index(make(n=300)[0], out)
    run = open_index(out)  # the driver's
    first = task_index(str(out), run.created_at)
    assert first.n == 300 and task_index(str(out), run.created_at) is first  # opened once per process
    build_index(make(n=400, seed=1)[0], out)
    with pytest.raises(IndexReplaced, match="was rebuilt or removed after it was opened"):
        task_index(str(out), run.created_at)  # the worker's open index is the old build
    new = open_index(out)
    assert new.created_at != run.created_at and task_index(str(out), new.created_at).n == 400
    with pytest.raises(IndexReplaced, match="was rebuilt after this run opened it; run the command again"):
        task_index(str(out), run.created_at)  # a task of the old run on a worker that opened the new build


def test_a_second_store_on_a_new_catalog_keeps_the_first_open(tmp_path):
    from clip_density_index.indexer.store import Store

    first = Store(tmp_path / "c.duckdb")  # creates the file
    second = Store(tmp_path / "c.duckdb")
    assert first.con.execute("SELECT 1").fetchall() == [(1,)]  # was: "Connection already closed"
    second.close()
    first.close()


def test_duckdbs_spill_folder_does_not_block_a_rebuild(tmp_path):
    out = tmp_path / "idx"
    build_index(make(n=300)[0], out)
    (out / "catalog.duckdb.tmp").mkdir()  # left by a query killed while spilling to disk
    assert build_index(make(n=400, seed=1)[0], out).replaced


def test_a_build_waiting_to_swap_turns_new_jobs_away(tmp_path):
    """New shared holders kept a build queued at the swap waiting for ever (flock lets them in)."""
    import threading

    from clip_density_index.indexer import lock
    from clip_density_index.indexer.errors import IndexBusy

    out = tmp_path / "idx"
    build_index(make(n=300)[0], out)
    first = lock.using(out, "score")
    first.__enter__()
    swapped = threading.Event()

    def build_swaps():
        with lock.replacing(out, wait=True):
            swapped.set()

    t = threading.Thread(target=build_swaps)
    t.start()
    deadline = time.monotonic() + 10
    while not lock._swap_pending(out) and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(IndexBusy, match="being replaced"), lock.using(out, "weights"):
        pass
    assert not swapped.is_set()
    first.__exit__(None, None, None)
    t.join(10)
    assert swapped.is_set()

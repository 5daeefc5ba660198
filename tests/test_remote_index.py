"""Indexes at a URI (``indexer.remote``): built to fsspec's ``memory://`` and opened from local
mirrors, scored there and published again, refused in one line when half-published, of another
format or without their protocol's package; a Ray score on a ``local://`` index whose workers
mirror it in their own cache folder, as nodes of a cluster do."""

import logging
import os
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import clustered_pairs
from clip_density_index import cli
from clip_density_index.indexer.build import build_index
from clip_density_index.indexer.errors import (BrokenIndex, FormatVersionMismatch, IndexNotFound, IndexReplaced,
                                               InvalidParameter)
from clip_density_index.indexer.pool import as_pool, open_index
from clip_density_index.indexer.remote import CACHE_ENV, MARKER, local_dir, publish, read_marker
from clip_density_index.indexer.sources import ArraySource
from clip_density_index.queries.score_params import SCORE_COLUMNS
from clip_density_index.queries.scoring import score

N, D = 400, 16
EXACT = dict(estimator="exact", metrics=["kl", "klr", "dc"], precision="float64")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """This test's folder of mirrors (``CLIP_DENSITY_INDEX_CACHE``)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def bucket():
    """A fresh ``memory://`` prefix (removed afterwards)."""
    mem = fsspec.filesystem("memory")
    root = f"/cdi-{uuid.uuid4().hex}"
    yield f"memory://{root}"
    if mem.exists(root):
        mem.rm(root, recursive=True)


def pairs(seed: int = 0, n: int = N) -> ArraySource:
    image, text = clustered_pairs(n, D, seed=seed)
    return ArraySource(image, text)


def scores(index) -> dict[str, np.ndarray]:
    with as_pool(index).store() as s:
        rows = list(s.query("SELECT * FROM scores ORDER BY vec_id"))
    return {c: np.array([r[c] for r in rows], dtype=float) for c in SCORE_COLUMNS}


def assert_same_scores(got: dict, want: dict, atol: float = 1e-12) -> None:
    for c in SCORE_COLUMNS:
        np.testing.assert_allclose(got[c], want[c], rtol=0, atol=atol, err_msg=c)


def test_built_to_a_uri_it_opens_from_a_mirror_and_scores_as_the_same_local_build(bucket, tmp_path, cache, caplog):
    uri = f"{bucket}/idx"
    report = build_index(pairs(), uri, index_key="IVF8,Flat", nprobe=8)
    build_index(pairs(), tmp_path / "local", index_key="IVF8,Flat", nprobe=8)
    assert report.uri == uri and report.path == local_dir(uri) and report.path.parent == cache
    assert "publish" in report.seconds

    # the URI holds the data files, the catalog and the marker, whose checksums are the build's
    marker = read_marker(uri)
    assert set(marker["files"]) == {"catalog.duckdb", "image_emb.npy", "text_emb.npy", "image_rawnorm.npy",
                                    "text_rawnorm.npy", "image.faiss", "text.faiss"}
    mem = fsspec.filesystem("memory")
    for name, rec in marker["files"].items():
        assert mem.size(f"{bucket[len('memory://'):]}/idx/{name}") == rec["bytes"], name
    pool = open_index(uri, cache_dir=tmp_path / "node-a")
    assert pool.uri == uri == pool.location and pool.root == local_dir(uri, tmp_path / "node-a")
    assert marker["created_at"] == pool.created_at
    for name in ("image_emb.npy", "image.faiss", "text_rawnorm.npy"):
        assert marker["files"][name]["crc32"] == pool.file_records[name]["crc32"], name

    caplog.set_level(logging.INFO, logger="clip_density_index.indexer.remote")
    caplog.clear()
    score(pool, **EXACT)  # writes the mirror's catalog, then publishes it
    score(tmp_path / "local", **EXACT)
    published = [r.getMessage() for r in caplog.records if r.getMessage().startswith("published")]
    assert published and all("(1 of 7 files uploaded)" in m for m in published)  # the catalog only

    fresh = open_index(uri, cache_dir=tmp_path / "node-b")  # another node: a new mirror
    assert fresh.root != pool.root
    assert_same_scores(scores(fresh), scores(tmp_path / "local"))
    assert not np.isnan(scores(fresh)["kl_text"]).any()


def test_a_stale_mirror_is_refreshed_with_the_files_that_changed(bucket, tmp_path):
    uri = f"{bucket}/idx"
    build_index(pairs(seed=1), uri)
    a = open_index(uri, cache_dir=tmp_path / "a")
    emb, catalog = os.stat(a.paths.embeddings("image")), os.stat(a.paths.catalog)

    score(open_index(uri, cache_dir=tmp_path / "b"), metrics=["dc"], side="text")  # another node scores
    again = open_index(uri, cache_dir=tmp_path / "a")
    assert again.root == a.root and not np.isnan(scores(again)["dc_text"]).any()
    now = os.stat(a.paths.embeddings("image"))
    assert (now.st_ino, now.st_mtime_ns) == (emb.st_ino, emb.st_mtime_ns)  # not downloaded again
    assert os.stat(a.paths.catalog).st_ino != catalog.st_ino
    a.check_current()  # the same build: what was open stays usable

    image, text = clustered_pairs(N, D, seed=2)
    build_index(ArraySource(image, text), uri)  # a rebuild at the URI
    third = open_index(uri, cache_dir=tmp_path / "a")
    assert third.created_at != a.created_at and third.file_records
    np.testing.assert_allclose(third.embeddings("image"), image / np.linalg.norm(image, axis=1, keepdims=True),
                               atol=1e-6)
    with third.store() as s:
        assert not s.has_table("scores")  # the new build's catalog, without the old scores
    with pytest.raises(IndexReplaced):
        a.embeddings("image")


def test_writing_an_index_rebuilt_at_its_uri_since_it_was_opened_is_refused(bucket, tmp_path):
    uri = f"{bucket}/idx"
    build_index(pairs(seed=1), uri)
    old = open_index(uri, cache_dir=tmp_path / "a")
    build_index(pairs(seed=2), uri)
    want = read_marker(uri)
    with pytest.raises(IndexReplaced, match=rf"^Index at {uri} was rebuilt or removed after this command opened it"):
        score(old, metrics=["dc"])
    assert read_marker(uri) == want  # nothing published over the new build


def test_a_half_published_or_foreign_index_is_refused_in_one_line(bucket, tmp_path):
    uri = f"{bucket}/idx"
    mem, root = fsspec.filesystem("memory"), f"{bucket[len('memory://'):]}/idx"
    with pytest.raises(IndexNotFound, match=rf"^No index at {bucket}/none: it has no {MARKER}"):
        open_index(f"{bucket}/none")
    build_index(pairs(), uri)
    marker = mem.cat_file(f"{root}/{MARKER}")

    mem.rm_file(f"{root}/{MARKER}")  # as an upload cut before its last file
    with pytest.raises(IndexNotFound) as e:
        open_index(uri, cache_dir=tmp_path / "fresh")
    assert str(e.value).startswith(f"{uri} holds no complete index: it has no {MARKER}") and "\n" not in str(e.value)
    assert not local_dir(uri, tmp_path / "fresh").exists()  # nothing mirrored

    mem.pipe_file(f"{root}/{MARKER}", marker.replace(b'"format_version": 1', b'"format_version": 99'))
    with pytest.raises(FormatVersionMismatch, match=rf"^Index at {uri} has format version 99; this tool reads"):
        open_index(uri, cache_dir=tmp_path / "fresh")

    mem.pipe_file(f"{root}/{MARKER}", marker)
    emb = mem.cat_file(f"{root}/text_emb.npy")
    mem.pipe_file(f"{root}/text_emb.npy", emb[:-4] + b"\0\0\0\0")  # damaged (or replaced) after publishing
    with pytest.raises(BrokenIndex, match=rf"^text_emb.npy of {uri}: downloaded .* bytes, crc32 .*; its {MARKER}"):
        open_index(uri, cache_dir=tmp_path / "fresh")
    assert not (local_dir(uri, tmp_path / "fresh") / "text_emb.npy").exists()  # not kept


def test_a_protocol_without_its_package_is_one_line(monkeypatch, tmp_path):
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "cdimissing",
                        {"class": "cdi_not_installed_pkg.FileSystem", "err": "Install cdi_not_installed_pkg"})
    want = (r"^cdimissing://b/idx: no filesystem for this URI is installed: pip install cdi_not_installed_pkg "
            r"\(fsspec's implementation of cdimissing://\)$")
    with pytest.raises(InvalidParameter, match=want):
        open_index("cdimissing://b/idx")
    with pytest.raises(InvalidParameter, match=want):
        build_index(pairs(), "cdimissing://b/idx")
    build_index(pairs(), tmp_path / "idx")
    with pytest.raises(InvalidParameter, match=want):
        publish(tmp_path / "idx", "cdimissing://b/idx")


def test_the_cli_builds_to_a_uri_and_its_index_commands_read_and_write_it(bucket, tmp_path, monkeypatch):
    uri = f"{bucket}/idx"
    run = CliRunner().invoke
    r = run(cli.cli, ["build-index", "--n", "500", "--dim", "16", "--out", uri, "-q"])
    assert r.exit_code == 0, r.output
    assert f"Built {uri}: 500 samples" in r.output and f"published to {uri}; its local mirror is" in r.output
    r = run(cli.cli, ["score", uri, "--metrics", "dc,clipscore", "-q"])
    assert r.exit_code == 0, r.output

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "other-node"))  # a machine without a mirror yet
    r = run(cli.cli, ["sql", uri, "SELECT count(clipscore) AS scored FROM scores", "-f", "csv"])
    assert r.exit_code == 0, r.output
    assert "scored\n500\n" in r.output
    r = run(cli.cli, ["info", uri])
    assert r.exit_code == 0 and f"Index {uri} (mirror {local_dir(uri)})" in r.output, r.output
    r = run(cli.cli, ["info", f"{bucket}/absent"])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        f"Error: No index at {bucket}/absent: it has no {MARKER} (build one there with "
        f"`cli.py build-index --out {bucket}/absent`)"]


def test_doctests():
    import doctest

    from clip_density_index.indexer import remote

    result = doctest.testmod(remote)
    assert result.attempted and not result.failed


# -- Ray: each worker mirrors the URI on its own node --------------------------------------------

@pytest.fixture(scope="module")
def ray_nodes(tmp_path_factory):
    """A Ray engine (2 CPUs) whose workers keep their mirrors in a cache folder of their own, as
    the nodes of a cluster do; and that folder."""
    pytest.importorskip("ray")
    from clip_density_index.indexer.engine import open_engine

    folder = tmp_path_factory.mktemp("workers-cache")
    with pytest.MonkeyPatch.context() as mp:  # the workers start with this environment
        mp.setenv(CACHE_ENV, str(folder))
        mp.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent)] + (
            [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        engine = open_engine("ray", num_cpus=2)
    yield engine, folder
    engine.close()


def test_a_ray_score_of_a_uri_index_mirrors_it_on_the_workers_and_equals_local(ray_nodes, tmp_path):
    engine, workers_cache = ray_nodes
    uri = f"local://{tmp_path / 'bucket' / 'idx'}"  # fsspec's LocalFileSystem: what the workers see too
    source = pairs(seed=7, n=2000)
    build_index(source, uri)
    build_index(source, tmp_path / "local")
    params = dict(estimator="exact", metrics=["kl", "klr"], precision="float64", batch_size=700)
    report = score(uri, engine=engine, **params)
    score(tmp_path / "local", **params)
    assert report.engine == "ray" and report.chunks_computed == 3
    assert (local_dir(uri, workers_cache) / MARKER).is_file()  # the workers' own mirror
    assert_same_scores(scores(open_index(uri, cache_dir=tmp_path / "fresh")), scores(tmp_path / "local"), 1e-9)

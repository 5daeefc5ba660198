"""Inputs through fsspec: the DataComp and clip-retrieval readers on ``memory://`` and ``file://`` URIs
give the same index as from local files; a URI without an installed filesystem is one clear line."""

from __future__ import annotations

import importlib.util
import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest

fsspec = pytest.importorskip("fsspec")

from clip_density_index.indexer.build import build_index  # noqa: E402
from clip_density_index.indexer.errors import BadInput, InvalidParameter  # noqa: E402
from clip_density_index.indexer.fs import RemotePath, input_path, is_uri  # noqa: E402
from clip_density_index.indexer.pool import open_index  # noqa: E402
from clip_density_index.indexer.reader import ClipRetrievalSource, DataCompSource  # noqa: E402
from clip_density_index.indexer.sources import make_source  # noqa: E402
from test_readers import collect, make_clip_retrieval, make_datacomp  # noqa: E402

SOURCES = {"datacomp": (DataCompSource, make_datacomp), "clip-retrieval": (ClipRetrievalSource, make_clip_retrieval)}


@pytest.fixture
def memfs():
    """fsspec's in-process ``memory://`` filesystem and a fresh root in it (removed afterwards)."""
    mem = fsspec.filesystem("memory")
    root = f"/cdi-{uuid.uuid4().hex}"
    yield mem, root
    if mem.exists(root):
        mem.rm(root, recursive=True)


def upload(local: Path, mem, root: str) -> str:
    """Copy a local folder into ``memory://ROOT``; return its URI."""
    mem.put(str(local), root, recursive=True)
    return f"memory://{root}"


def catalog(index_dir: Path) -> dict:
    """Everything an index holds that a reader could differ on: embeddings, samples rows, stats."""
    pool = open_index(index_dir)
    with pool.store() as s:
        rows = [tuple(r.values()) for r in s.query("SELECT * FROM samples ORDER BY vec_id")]
        columns = [r["column_name"] for r in s.query(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'samples' ORDER BY ordinal_position")]
        stats = {(r["modality"], r["name"]): r["value"] for r in s.query("SELECT modality, name, value FROM modality_stats")}
    out = {"n": pool.n, "dim": pool.dim, "rows": rows, "columns": columns, "stats": stats,
           "emb": {m: np.array(pool.embeddings(m)) for m in ("image", "text")}}
    pool.close()
    return out


# ------------------------------------------------------------------------------ locations


def test_plain_paths_and_file_uris_stay_local_paths(tmp_path):
    assert not is_uri(str(tmp_path)) and not is_uri("relative/dir") and not is_uri(tmp_path)
    assert input_path(str(tmp_path)) == tmp_path and isinstance(input_path("a/b"), Path)
    assert input_path(f"file://{tmp_path}") == tmp_path
    assert input_path(f"file://localhost{tmp_path}") == tmp_path
    with pytest.raises(InvalidParameter, match="file://otherhost/x: a file:// URI names a path on this machine"):
        input_path("file://otherhost/x")


def test_remote_path_names_and_pickles(memfs):
    mem, root = memfs
    mem.pipe(f"{root}/shards/0001.parquet", b"0123456789")
    p = input_path(f"memory://{root}/shards")
    assert isinstance(p, RemotePath) and str(p) == f"memory://{root}/shards" and p.is_dir() and p.exists()
    f = p / "0001.parquet"
    assert (f.name, f.stem, f.suffix) == ("0001.parquet", "0001", ".parquet")
    assert str(f.with_suffix(".npz")) == f"memory://{root}/shards/0001.npz" and not f.with_suffix(".npz").exists()
    assert f.is_file() and not f.is_dir() and f.stat().st_size == 10 and f.parent == p
    assert [q.name for q in p.glob("*.parquet")] == ["0001.parquet"] and list(p.glob("*.npz")) == []
    assert [q.name for q in p.iterdir()] == ["0001.parquet"]
    assert f.read_range(2, 5) == b"234" and f.read_range(5, 5) == b""
    with pytest.raises(OSError, match="shorter than its header says"):
        f.read_range(8, 20)
    back = pickle.loads(pickle.dumps(f))  # what a Ray task receives
    assert back == f and back.read_range(0, 3) == b"012"


def test_a_protocol_without_its_package_is_one_line_naming_the_uri_and_package(monkeypatch):
    from fsspec.registry import known_implementations

    # a protocol fsspec knows whose implementation is not installed (as s3:// is without s3fs)
    monkeypatch.setitem(known_implementations, "cdimissing",
                        {"class": "cdi_not_installed_pkg.FileSystem", "err": "Install cdi_not_installed_pkg"})
    with pytest.raises(InvalidParameter) as e:
        DataCompSource("cdimissing://bucket/metadata")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cdimissing://bucket/metadata: ")
    assert "pip install cdi_not_installed_pkg" in msg
    with pytest.raises(InvalidParameter, match=r"nosuchproto://x/y: unknown protocol 'nosuchproto'"):
        ClipRetrievalSource("nosuchproto://x/y")


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed here")
def test_s3_without_s3fs_names_s3fs():
    with pytest.raises(InvalidParameter, match=r"^s3://bucket/metadata: .*pip install s3fs"):
        DataCompSource("s3://bucket/metadata")


def test_without_fsspec_a_uri_names_fsspec(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_fsspec(name, *args, **kwargs):
        if name == "fsspec" or name.startswith("fsspec."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fsspec)
    with pytest.raises(InvalidParameter, match=r"^memory://pool: reading URIs needs fsspec: pip install fsspec"):
        input_path("memory://pool")
    assert input_path("local/dir") == Path("local/dir")  # plain paths never need it


# ------------------------------------------------------------------------------ readers


@pytest.mark.parametrize("kind", SOURCES)
def test_memory_and_file_uris_read_what_the_local_path_reads(tmp_path, rng, memfs, kind):
    cls, make = SOURCES[kind]
    make(tmp_path / "in", rng)
    uri = upload(tmp_path / "in", *memfs)
    local, remote, file_uri = cls(tmp_path / "in"), cls(uri), cls(f"file://{tmp_path / 'in'}")
    assert isinstance(file_uri.path, Path) and isinstance(remote.path, RemotePath)
    assert remote.info.extra["path"] == uri and remote.info.n == local.info.n and remote.info.dim == local.info.dim
    assert remote.info.dtype == local.info.dtype == "float16"
    want = collect(local, 10)
    for other in (remote, file_uri):
        got = collect(other, 10)
        assert got[1].equals(want[1])
        np.testing.assert_array_equal(got[2], want[2])
        np.testing.assert_array_equal(got[3], want[3])
        assert [len(b.meta) for b in got[0]] == [len(b.meta) for b in want[0]]
        assert [b.row_offset for b in got[0]] == [b.row_offset for b in want[0]]
    assert all(b.origin.startswith(uri + "/") for b in collect(remote, 10)[0])


def test_remote_npy_rows_are_streamed_a_batch_at_a_time(tmp_path, rng, memfs, monkeypatch):
    make_clip_retrieval(tmp_path / "cr", rng, sizes=(37, 23), dim=16)
    src = ClipRetrievalSource(upload(tmp_path / "cr", *memfs))
    reads = []
    real = RemotePath.read_range

    def counted(self, start, stop):
        reads.append((self.name, stop - start))
        return real(self, start, stop)

    monkeypatch.setattr(RemotePath, "read_range", counted)
    batches = list(src.batches(10))
    row = 16 * 2  # float16, dim 16
    assert [n for name, n in reads if name.startswith("img_emb")] == [10 * row] * 3 + [7 * row] + [10 * row] * 2 + [3 * row]
    assert len(reads) == 2 * len(batches)
    assert all(b.image.flags.c_contiguous and b.image.shape == (len(b.meta), 16) for b in batches)


def test_remote_fortran_order_and_compressed_members_are_read_whole(tmp_path, rng, memfs):
    make_clip_retrieval(tmp_path / "cr", rng, sizes=(12,), dim=8)
    img_file = tmp_path / "cr" / "img_emb" / "img_emb_00.npy"
    img = np.load(img_file)
    np.save(img_file, np.asfortranarray(img))
    got = collect(ClipRetrievalSource(upload(tmp_path / "cr", *memfs)), 5)[2]
    np.testing.assert_array_equal(got, img)


def test_remote_bad_inputs_name_the_uri(tmp_path, rng, memfs):
    mem, root = memfs
    with pytest.raises(BadInput, match=rf"DataComp metadata directory memory://{root}/nothing does not exist"):
        DataCompSource(f"memory://{root}/nothing")
    make_clip_retrieval(tmp_path / "cr", rng, sizes=(12,), dim=8)
    npy = tmp_path / "cr" / "text_emb" / "text_emb_00.npy"
    npy.write_bytes(npy.read_bytes()[:-40])
    uri = upload(tmp_path / "cr", mem, root)
    with pytest.raises(BadInput, match=rf"Cannot read {uri}/text_emb/text_emb_00.npy: file is truncated"):
        ClipRetrievalSource(uri)


# ------------------------------------------------------------------------------ whole builds


@pytest.mark.parametrize("kind", SOURCES)
def test_an_index_built_from_memory_uri_equals_the_one_from_local_files(tmp_path, rng, memfs, kind):
    cls, make = SOURCES[kind]
    make(tmp_path / "in", rng, sizes=(150, 90))
    uri = upload(tmp_path / "in", *memfs)
    build_index(cls(tmp_path / "in"), tmp_path / "local", batch_size=64)
    build_index(cls(uri), tmp_path / "remote", batch_size=64)
    a, b = catalog(tmp_path / "local"), catalog(tmp_path / "remote")
    assert a["n"] == b["n"] == 240 and a["dim"] == b["dim"] and a["columns"] == b["columns"]
    assert a["rows"] == b["rows"] and len(a["rows"]) == 240
    assert a["stats"].keys() == b["stats"].keys() and all(a["stats"][k] == b["stats"][k] for k in a["stats"])
    for m in ("image", "text"):
        np.testing.assert_array_equal(a["emb"][m], b["emb"][m])


def test_build_index_cli_reads_a_uri_and_refuses_one_without_its_filesystem(tmp_path, rng, memfs, monkeypatch):
    from click.testing import CliRunner
    from fsspec.registry import known_implementations

    from clip_density_index import cli

    make_datacomp(tmp_path / "dc", rng)
    uri = upload(tmp_path / "dc", *memfs)
    r = CliRunner().invoke(cli.cli, ["build-index", "--source", "datacomp", "--input", uri,
                                     "--out", str(tmp_path / "idx"), "-q"])
    assert r.exit_code == 0, r.output
    assert "Built" in r.output and open_index(tmp_path / "idx").n == 60

    monkeypatch.setitem(known_implementations, "cdimissing",
                        {"class": "cdi_not_installed_pkg.FileSystem", "err": "Install cdi_not_installed_pkg"})
    r = CliRunner().invoke(cli.cli, ["build-index", "--source", "clip-retrieval", "--input", "cdimissing://b/cr",
                                     "--out", str(tmp_path / "idx2")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == [
        "Error: cdimissing://b/cr: no filesystem for this URI is installed: pip install cdi_not_installed_pkg "
        "(fsspec's implementation of cdimissing://)"]

    r = CliRunner().invoke(cli.cli, ["build-index", "--source", "datacomp", "--input", str(tmp_path / "absent"),
                                     "--out", str(tmp_path / "idx3")])
    assert r.exit_code == 2 and "does not exist" in r.output  # local paths are still checked by click


def test_open_clip_refuses_a_remote_input_in_one_line():
    with pytest.raises(InvalidParameter, match=r"^--input memory://images: the open_clip source reads a local"):
        make_source("open_clip", "memory://images", pretrained=None)

"""Faults: a kill at any point of a build, a full disk, a damaged catalog or data file.

Kills use the fault points of ``indexer.faults`` (``CLIP_DENSITY_INDEX_FAULT``) in a CLI subprocess;
a full disk is a small tmpfs (skipped where it cannot be mounted) or an error raised at a chosen
point; damage is bytes flipped or rows changed in a built index.
"""

import contextlib
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pytest

from conftest import ROOT, clustered_pairs
from clip_density_index.indexer.build import build_index
from clip_density_index.indexer.errors import BrokenIndex, DiskFull
from clip_density_index.indexer.faults import ENV
from clip_density_index.indexer.pool import open_index
from clip_density_index.indexer.sources import ArraySource

CLI = [sys.executable, str(ROOT / "cli.py")]


def run_cli(*args, fault=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if fault:
        env[ENV] = fault
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def build_cli(out, n, fault=None, *extra):
    return run_cli("build-index", "--n", n, "--dim", 16, "--out", out, "-q", *extra, fault=fault)


def one_line_error(result, *needles):
    """The command failed with one ``Error:`` line naming ``needles``, and no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def pool_n(out) -> int:
    with open_index(out) as pool:
        return pool.n


def make(n=300, d=16, seed=0):
    image, text = clustered_pairs(n, d, seed)
    return ArraySource(image, text)


# -- 1: a kill at any point of a build -----------------------------------------------------------
@pytest.mark.parametrize("point, committed, next_command", [
    ("build.after_embeddings", False, "info"), ("build.after_faiss", False, "info"),
    ("build.before_swap", False, "info"), ("swap.after_old_renamed", False, "info"),
    ("swap.after_old_renamed", False, "build-index"), ("swap.after_new_renamed", True, "info"),
    ("swap.removing_old", True, "info"), ("swap.removing_old", True, "build-index"),
])
def test_a_kill_at_any_point_of_a_build_leaves_an_index_the_next_command_uses(tmp_path, point, committed,
                                                                              next_command):
    out = tmp_path / "idx"
    build_index(make(300), out)
    with duckdb.connect(str(out / "catalog.duckdb")) as con:  # the old index's own work (scores, weights)
        con.execute("CREATE TABLE weights AS SELECT 'p' AS prompt, 1.0 AS weight")
    killed = build_cli(out, 400, point, "--index-factory", "IVF4,Flat")
    assert killed.returncode == -9, (killed.returncode, killed.stderr)  # SIGKILL at the point
    if next_command == "info":
        r = run_cli("info", out)
        assert r.returncode == 0, r.stderr
        assert pool_n(out) == (400 if committed else 300)
        if not committed:
            with duckdb.connect(str(out / "catalog.duckdb"), read_only=True) as con:
                assert con.execute("SELECT count(*) FROM weights").fetchall() == [(1,)]
    else:  # a rebuild that fails: the index at out is still there, whole
        r = build_cli(out, 1, None)  # --n 1: refused (an index needs two samples)
        assert r.returncode == 2 and pool_n(out) == (400 if committed else 300)
        r = build_cli(out, 500, None)
        assert r.returncode == 0, r.stderr
        assert pool_n(out) == 500
    if next_command == "build-index" or committed:  # nothing left beside the index
        left = sorted(p.name for p in tmp_path.iterdir() if p.name != "idx")
        assert left == [], left


def test_an_old_copy_without_proof_is_kept(tmp_path):
    """A moved-aside index that the current one's .build does not name is not deleted."""
    out = tmp_path / "idx"
    build_index(make(300), out)
    stray = tmp_path / f".idx.old-999999-{uuid.uuid4().hex[:8]}"
    build_index(make(300, seed=1), stray)  # an index that some killed build moved aside
    with open_index(out):
        pass
    assert stray.is_dir() and (stray / "catalog.duckdb").is_file()


#: ``cli.py`` with the scores stored in ranges of 100 rows (``queries.score_store.STORE_ROWS``).
CLI_RANGES_OF_100 = [sys.executable, "-c",
                     "import sys; from clip_density_index.queries import score_store; score_store.STORE_ROWS = 100; "
                     "from clip_density_index.cli import cli; cli(sys.argv[1:], prog_name='cli.py')"]


def test_a_kill_in_the_middle_of_the_ranged_store_leaves_the_old_scores(tmp_path):
    """SIGKILL after the first of three ranges of the new scores table: the old table, its runs,
    no scores__new; the killed run's column files stay in its work folder until the next run."""
    out = tmp_path / "idx"
    build_index(make(300), out)
    assert run_cli("score", out, "--metrics", "dc", "-q").returncode == 0

    def catalog():
        with duckdb.connect(str(out / "catalog.duckdb"), read_only=True) as con:
            names = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            rows = con.execute("SELECT vec_id, dc_text, dw_text FROM scores ORDER BY vec_id").fetchall()
            return names, rows, con.execute("SELECT count(*) FROM score_runs").fetchone()[0]

    names, before, runs = catalog()
    env = {**os.environ, ENV: "score.store_range"}
    killed = subprocess.run(CLI_RANGES_OF_100 + ["score", str(out), "--metrics", "dc,dw", "-q"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    after_names, after, after_runs = catalog()
    assert "scores__new" not in after_names and after == before and after_runs == runs == 1
    assert sorted(p.name for p in out.glob("work/*/columns/*.npy")) == [
        "dc_image.npy", "dc_text.npy", "dw_image.npy", "dw_text.npy"]
    done = subprocess.run(CLI_RANGES_OF_100 + ["score", str(out), "--metrics", "dc,dw", "-q"],
                          env={k: v for k, v in os.environ.items() if k != ENV}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    _, rows, runs = catalog()
    assert all(dw is None for _, _, dw in before)
    assert runs == 2 and [r[:2] for r in rows] == [r[:2] for r in before] and all(dw is not None for *_, dw in rows)
    assert not (out / "work").exists()


# -- 2 / 3: a full disk ----------------------------------------------------------------------------
@contextlib.contextmanager
def small_fs(path: Path, size: str):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill ({r.stderr.strip() or r.returncode}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(fs: Path, leave: int) -> None:
    """Fill ``fs`` up to ``leave`` free bytes."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    with open(fs / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_a_build_on_a_full_disk_is_one_line_and_keeps_the_old_index(tmp_path):
    with small_fs(tmp_path / "fs", "4m") as fs:
        out = fs / "idx"
        assert build_cli(out, 300).returncode == 0
        def files():
            return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}

        before = files()
        for n, extra in ((20000, ()), (1500, ("--index-factory", "IVF8,Flat"))):
            r = build_cli(out, n, None, *extra)
            line = one_line_error(r, "No space left on the device of", str(fs), "needs about",
                                  f"the previous index at '{out}' is unchanged")
            assert "free" in line
            assert files() == before
            assert sorted(p.name for p in fs.iterdir()) == ["idx"]  # the half-written build is removed
        assert run_cli("info", out).returncode == 0


@pytest.mark.parametrize("where", ["npy", "catalog", "faiss"])
def test_a_full_disk_at_each_stage_of_a_build_is_named(tmp_path, monkeypatch, where):
    """Errors as each layer raises them on a full disk (OSError 28, DuckDB, FAISS's RuntimeError)."""
    import errno

    import clip_density_index.indexer.build as b
    from clip_density_index.indexer import faiss_index

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "npy":
        monkeypatch.setattr(b.NpyWriter, "write", enospc)
    elif where == "catalog":
        def catalog_full(*a, **k):
            raise duckdb.TransactionException("TransactionContext Error: Failed to commit: could not write file "
                                              "\"catalog.duckdb.wal\": No space left on device")
        monkeypatch.setattr(b, "_insert_stats", catalog_full)
    else:
        def faiss_full(*a, **k):
            raise RuntimeError("Error in faiss::FileIOWriter::operator() at faiss/impl/io.cpp:98: fwrite failed: "
                               "No space left on device")
        monkeypatch.setattr(faiss_index, "save_index", faiss_full)
    out = tmp_path / "idx"
    with pytest.raises(DiskFull, match=rf"No space left on the device of '{tmp_path}' while writing the new "
                                       rf"index for '{out}': it needs about .* free; nothing was written"):
        build_index(make(300), out, index_key="IVF4,Flat")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["sql", "select"])
def test_an_out_file_on_a_full_disk_is_one_line_and_an_old_file_stays(tmp_path, command):
    out = tmp_path / "idx"
    build_index(make(3000), out)
    run = {"sql": lambda f, *x: run_cli("sql", out, "SELECT uid, caption FROM samples", "--out", f, *x),
           "select": lambda f, *x: run_cli("select", out, "--by", "dc_text", "--top-fraction", "1", "--out", f, *x)}
    if command == "select":
        assert run_cli("score", out, "--metrics", "dc", "-q").returncode == 0
    with small_fs(tmp_path / "fs", "1m") as fs:
        target = fs / ("rows.csv" if command == "sql" else "subset.txt")
        target.write_text("old\n")
        fill(fs, 8192)
        r = run[command](target, "--force")
        one_line_error(r, "No space left on the device of", str(target), "unchanged")
        assert target.read_text() == "old\n"
        assert sorted(p.name for p in fs.iterdir()) == ["filler", target.name]  # no temporary left


def test_weights_say_they_were_stored_when_only_the_out_file_failed(tmp_path, monkeypatch):
    import clip_density_index.queries.weighting as qw

    out = tmp_path / "idx"
    build_index(make(300), out)

    def full(*a, **k):
        raise DiskFull("No space left on the device of 'w.parquet' while writing w.parquet")

    monkeypatch.setattr(qw, "write_weights", full)
    vec = np.ones(16, dtype=np.float32)
    np.save(tmp_path / "p.npy", vec)
    with pytest.raises(DiskFull, match=r"the weights themselves were stored \(table weights of"):
        qw.weights(out, prompt_embedding=tmp_path / "p.npy", out=tmp_path / "w.parquet")
    with duckdb.connect(str(out / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM weights").fetchall() == [(300,)]


# -- 4: a damaged catalog ----------------------------------------------------------------------------
def flip(path: Path, offset: int, count: int = 8) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(count))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def sql_on(out, *statements):
    with duckdb.connect(str(out / "catalog.duckdb")) as con:
        for s in statements:
            con.execute(s)


CATALOG_DAMAGE = {
    "header bytes": (lambda out: flip(out / "catalog.duckdb", 0, 16), "catalog.duckdb"),
    "a block": (lambda out: flip(out / "catalog.duckdb", 4096, 64), "catalog.duckdb"),
    "truncated": (lambda out: os.truncate(out / "catalog.duckdb", os.path.getsize(out / "catalog.duckdb") // 2),
                  "catalog.duckdb"),
    "index_params": (lambda out: sql_on(out, "UPDATE manifest SET index_params = '[1,2]'"), "index_params"),
    "extra": (lambda out: sql_on(out, "UPDATE manifest SET extra = '[1]'"), "extra"),
    "dropped samples": (lambda out: sql_on(out, "DROP TABLE samples"), "no samples table"),
    "dropped stats": (lambda out: sql_on(out, "DROP TABLE modality_stats"), "no modality_stats table"),
    "missing statistic": (lambda out: sql_on(out, "DELETE FROM modality_stats WHERE name = 'cov' AND "
                                                  "modality = 'text'"), "modality_stats has"),
    "missing sample row": (lambda out: sql_on(out, "DELETE FROM samples WHERE vec_id = 7"), "samples has 299 rows"),
}


@pytest.mark.parametrize("damage", sorted(CATALOG_DAMAGE))
@pytest.mark.parametrize("command", ["info", "sql"])
def test_a_damaged_catalog_is_one_line_naming_it(tmp_path, damage, command):
    out = tmp_path / "idx"
    build_index(make(300), out)
    do, needle = CATALOG_DAMAGE[damage]
    do(out)
    args = ("info", out) if command == "info" else ("sql", out, "SELECT count(*) FROM samples")
    r = run_cli(*args)
    if damage == "missing statistic" and command == "sql":  # SQL never reads the statistics
        assert r.returncode == 0, r.stderr
        r = run_cli("score", out, "--metrics", "dw", "-q")
    one_line_error(r, "catalog.duckdb", needle)


# -- 5: damaged data files ----------------------------------------------------------------------------
def npy_offset(path: Path) -> int:
    from clip_density_index.indexer.integrity import npy_header

    return npy_header(path)[2]


def test_flipped_bytes_in_a_faiss_file_are_refused_not_scored(tmp_path):
    out = tmp_path / "idx"
    build_index(make(600), out, index_key="IVF4,Flat")
    size = (out / "image.faiss").stat().st_size
    flip(out / "image.faiss", size // 2, 64)
    np.save(tmp_path / "p.npy", np.ones(16, dtype=np.float32))
    r = run_cli("sample", out, "--prompt-embedding", tmp_path / "p.npy", "-n", 5, "--mode", "top")
    one_line_error(r, "image.faiss", "checksum")
    with pytest.raises(BrokenIndex, match=r"image.faiss' does not match its checksum"):
        open_index(out).faiss("image")


@pytest.mark.parametrize("value", [1e30, np.nan, 1e3])
def test_a_value_no_unit_vector_has_is_refused(tmp_path, value):
    out = tmp_path / "idx"
    build_index(make(300), out)
    p = out / "text_emb.npy"
    emb = np.load(p, mmap_mode="r+")
    emb[42, 3] = value
    emb.flush()
    del emb
    r = run_cli("score", out, "--metrics", "dw", "-q")
    one_line_error(r, "text_emb.npy", "row 42")
    with pytest.raises(BrokenIndex, match=r"text_emb.npy: row 42 has norm"):
        open_index(out).embeddings("text")


def test_nan_in_image_embeddings_is_refused_by_weights_and_sample(tmp_path):
    out = tmp_path / "idx"
    build_index(make(300), out)
    emb = np.load(out / "image_emb.npy", mmap_mode="r+")
    emb[5, 0] = np.nan
    emb.flush()
    del emb
    np.save(tmp_path / "p.npy", np.ones(16, dtype=np.float32))
    one_line_error(run_cli("weights", out, "--prompt-embedding", tmp_path / "p.npy"), "image_emb.npy", "row 5")
    one_line_error(run_cli("sample", out, "--prompt-embedding", tmp_path / "p.npy", "-n", 300, "--mode", "top"),
                   "image_emb.npy", "row 5")


def test_an_npy_header_rewritten_to_another_type_is_refused_on_open(tmp_path):
    out = tmp_path / "idx"
    build_index(make(300), out)
    p = out / "image_emb.npy"
    data = p.read_bytes()
    assert b"'<f4'" in data[:128]
    p.write_bytes(data.replace(b"'<f4'", b"'<f2'", 1))
    r = run_cli("sample", out, "--prompt-embedding", ROOT / "missing.npy", "-n", 3, "--exact")
    assert "Traceback" not in r.stderr and r.returncode != 0
    with pytest.raises(BrokenIndex, match=r"image_emb.npy' holds <f2 values by its header; the manifest says float32"):
        open_index(out)


def test_info_verify_finds_a_flip_that_keeps_unit_norms(tmp_path):
    out = tmp_path / "idx"
    build_index(make(300), out)
    assert run_cli("info", out, "--verify").returncode == 0
    p = out / "text_emb.npy"
    flip(p, npy_offset(p) + 4 * 100, 1)  # the lowest mantissa byte of one value: its norm stays ~1
    with open_index(out) as pool:
        pool.embeddings("text")  # passes the cheap check
    r = run_cli("info", out, "--verify")
    one_line_error(r, "1 of", "text_emb.npy", "checksum")
    assert re.search(r"text_emb\.npy +FAILED", r.stdout) and re.search(r"image_emb\.npy +ok", r.stdout)


def test_an_index_built_before_checksums_opens_with_a_note(tmp_path):
    out = tmp_path / "idx"
    build_index(make(300), out)
    sql_on(out, "DROP TABLE data_files")
    with open_index(out) as pool:
        assert any("no checksums" in n for n in pool.notes)
        assert pool.embeddings("image").shape == (300, 16)
    r = run_cli("info", out, "--verify")
    assert r.returncode == 0, r.stderr
    assert "no checksum recorded" in r.stdout and "no checksums" in r.stderr


def test_out_never_overwrites_a_file_of_an_index(tmp_path):
    out = tmp_path / "idx"
    build_index(make(300), out)
    before = (out / "catalog.duckdb").read_bytes()
    r = run_cli("sql", out, "SELECT 1 AS x", "--out", out / "catalog.duckdb", "--force", "--format", "csv")
    one_line_error(r, "catalog.duckdb", "is a file of the index")
    assert (out / "catalog.duckdb").read_bytes() == before
    assert run_cli("sql", out, "SELECT 1 AS x", "--out", out / "x.csv").returncode == 0  # other names: fine


def test_a_killed_out_write_leaves_no_temporary_behind(tmp_path):
    from clip_density_index.queries.outfile import atomic_write

    stale = tmp_path / ".rows.csv.tmp-999999"  # a write killed mid-way (no such process)
    stale.write_text("half")
    atomic_write(tmp_path / "rows.csv", lambda p: p.write_text("a\n"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]

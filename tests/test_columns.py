"""A score run's columns as files (``queries.columns``) and the ``scores`` table stored in row
ranges (``queries.score_store.STORE_ROWS``): the same table whatever the range, the old table kept
when the ranged insert fails, the files gone with the work folder."""

import shutil

import numpy as np
import pytest

from conftest import clustered_pairs
from clip_density_index.indexer.build import build_index
from clip_density_index.indexer.errors import DiskFull
from clip_density_index.indexer.pool import open_index
from clip_density_index.indexer.sources import ArraySource
from clip_density_index.queries import score_store
from clip_density_index.queries.columns import FOLDER, Columns
from clip_density_index.queries.exact import Moments
from clip_density_index.queries.scoring import score

N = 2500  # not a multiple of the lowered range: the last range is short


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An index of 2,500 clustered 16-d pairs without raw norms (rawnorm_* are NaN, stored NULL)."""
    image, text = clustered_pairs(N, 16, seed=2)
    root = tmp_path_factory.mktemp("columns")
    build_index(ArraySource(image, text, raw_known=False), root / "idx", index_key="IVF8,Flat", nprobe=8)
    return root / "idx"


@pytest.fixture
def index(built, tmp_path):
    shutil.copytree(built, tmp_path / "idx")
    return tmp_path / "idx"


def table(path, sql="SELECT * FROM scores ORDER BY vec_id"):
    with open_index(path).store() as s:
        return list(s.query(sql))


def tables(path):
    return [r["table_name"] for r in table(path, "SELECT table_name FROM information_schema.tables")]


# -- the column files -----------------------------------------------------------------------------
def test_a_column_is_a_float64_file_written_through_its_map(tmp_path):
    folder = tmp_path / "work" / FOLDER
    folder.mkdir(parents=True)
    (folder / "kl_text.npy").write_bytes(b"left by a killed run")
    with Columns(folder, 1000) as cols:
        assert not (folder / "kl_text.npy").exists()  # a killed run's files are not reused
        dc = cols.new("dc_text")
        dc[:] = np.arange(1000) / 7
        assert isinstance(dc, np.memmap) and list(cols) == ["dc_text"] and len(cols) == 1
        assert (folder / "dc_text.npy").stat().st_size >= 8 * 1000
        np.testing.assert_array_equal(np.load(folder / "dc_text.npy"), np.arange(1000) / 7)
        with pytest.raises(ValueError, match="dc_text"):
            cols.new("dc_text")
        with pytest.raises(ValueError, match="not a new column name"):
            cols.new("../x")
    assert not folder.exists()


def test_a_full_disk_while_making_a_column_is_one_error_naming_the_folder(tmp_path, monkeypatch):
    import errno
    import os

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with Columns(tmp_path / FOLDER, 1000) as cols:
        with pytest.raises(DiskFull, match="score column 'kl_image'") as e:
            cols.new("kl_image")
    assert str(tmp_path / FOLDER) in str(e.value) and "7.8 KiB" in str(e.value)


def test_kl_into_blocks_equals_kl_bit_for_bit():
    rng = np.random.default_rng(1)
    m = Moments.of(rng.normal(size=1001), rng.uniform(1, 5, 1001), rng.normal(size=1001))
    mean = rng.normal(size=1001)
    for b in (None, -10.0):
        kl, klr = np.empty(1001), np.empty(1001)
        m.kl_into(kl, klr, mean, 5000, b, block=97)
        want = m.kl(mean, 5000, b)
        np.testing.assert_array_equal(kl, want[0])
        np.testing.assert_array_equal(klr, want[1])


# -- the store in row ranges ----------------------------------------------------------------------
def test_ranges_of_1000_rows_store_the_same_table_bit_for_bit(index, tmp_path, monkeypatch):
    """Two runs (the second carries the first's columns over), once in one range and once in ranges
    of 1,000 rows: the same table, row for row and bit for bit (NaN stored as NULL)."""
    ranged = tmp_path / "ranged"
    shutil.copytree(index, ranged)
    first = dict(metrics=["dc", "rawnorm", "clipscore"])
    second = dict(estimator="paper", paper_sample=0.05, metrics=["kl", "klr", "loglik"], side="text", check=50)
    assert score_store.STORE_ROWS >= N
    score(index, **first)
    score(index, **second)
    monkeypatch.setattr(score_store, "STORE_ROWS", 1000)
    inserts = []
    real = score_store.row_ranges

    def counted(cols, n):
        for lo, hi, part in real(cols, n):
            inserts.append((lo, hi, part.num_rows))
            yield lo, hi, part

    monkeypatch.setattr(score_store, "row_ranges", counted)
    score(ranged, **first)
    score(ranged, **second)
    assert inserts == [(0, 1000, 1000), (1000, 2000, 1000), (2000, 2500, 500)] * 2
    want, got = table(index), table(ranged)
    assert len(got) == N and [r["vec_id"] for r in got] == list(range(N))
    assert got == want  # every value equal, NULLs included (NaN != NaN would fail here)
    assert all(r["rawnorm_text"] is None and r["dc_text"] is not None and r["kl_text"] is not None for r in got)
    assert all(r["dc_image"] is not None and r["clipscore"] is not None for r in got)  # carried over
    assert not (index / "work").exists() and not (ranged / "work").exists()


def test_a_failure_in_the_middle_of_the_ranged_insert_leaves_the_old_scores(index, monkeypatch):
    from clip_density_index.indexer import store as store_module

    score(index, metrics=["dc"], side="text")
    before = table(index)
    monkeypatch.setattr(score_store, "STORE_ROWS", 1000)
    reached = []

    def dying(name):
        reached.append(name)
        if len(reached) == 2:
            raise KeyboardInterrupt("killed after the second range")

    monkeypatch.setattr(store_module, "fault_point", dying)
    with pytest.raises(KeyboardInterrupt):
        score(index, metrics=["dc", "conformity"], side="text")
    assert reached == ["score.store_range"] * 2
    assert "scores__new" not in tables(index) and table(index) == before
    assert [r["run_id"] for r in table(index, "SELECT run_id FROM score_runs")] == [1]
    [work] = (index / "work").iterdir()
    assert not (work / FOLDER).exists()  # an error removes the column files (a kill leaves them)
    monkeypatch.setattr(store_module, "fault_point", lambda name: None)
    score(index, metrics=["dc", "conformity"], side="text")
    assert all(r["conformity_text"] is not None for r in table(index)) and not (index / "work").exists()


def test_the_columns_are_memory_maps_in_the_work_folder_until_the_run_ends(index, monkeypatch):
    real, seen = score_store.store_scores, {}

    def peek(pool, p, cols, report, started):
        seen.update({c: v.filename for c, v in cols.items() if isinstance(v, np.memmap)})
        seen["files"] = sorted(f.name for f in (index / "work").glob(f"*/{FOLDER}/*.npy"))
        return real(pool, p, cols, report, started)

    monkeypatch.setattr("clip_density_index.queries.scoring.store_scores", peek)
    score(index, estimator="mimps", k=8, tail_sample=32, metrics=["kl", "dc"], side="image", check=50)
    files = seen.pop("files")
    assert sorted(seen) == ["dc_image", "kl_image"]  # klr_image was made but not asked for: not stored
    assert files == ["dc_image.npy", "kl_image.npy", "klr_image.npy"]
    assert all("/work/score-" in str(path) for path in seen.values())
    assert not (index / "work").exists()
    stored = table(index)
    assert all(r["klr_image"] is None and r["kl_image"] is not None for r in stored)

"""``score --engine ray`` on a real local Ray cluster (2 CPUs): the same numbers as the local engine
(exact to 1e-9 in float64, the approximations with the same definitions and seeds), a worker killed
mid-run costs only its task, and a run interrupted on one engine resumes on the other."""

import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import clustered_pairs, exact_pass_killed_at
from clip_density_index.indexer.build import build_index
from clip_density_index.indexer.engine import open_engine
from clip_density_index.indexer.faults import ARMED_ENV
from clip_density_index.indexer.pool import open_index
from clip_density_index.indexer.sources import ArraySource
from clip_density_index.queries import kl_engine
from clip_density_index.queries.exact import Moments, exact_moments
from clip_density_index.queries.score_params import SCORE_COLUMNS
from clip_density_index.queries.scoring import score

ray = pytest.importorskip("ray")

N = 20_000
KL = [f"{m}_{s}" for m in ("kl", "klr") for s in ("text", "image")]
EXACT = dict(estimator="exact", metrics=["kl", "klr"], precision="float64", batch_size=6000)


@pytest.fixture(scope="module")
def armed(tmp_path_factory):
    """The folder of armed fault points the cluster's workers watch (``indexer.faults``)."""
    return tmp_path_factory.mktemp("armed")


@pytest.fixture(scope="module")
def engine(armed):
    # the workers start with this environment (the armed-points folder); this process does not keep it
    os.environ[ARMED_ENV] = str(armed)
    try:
        eng = open_engine("ray", num_cpus=2)
    finally:
        os.environ.pop(ARMED_ENV)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 20k-pair index (64-d, IVF), built once."""
    image, text = clustered_pairs(N, 64, seed=11)
    root = tmp_path_factory.mktemp("ray-built")
    build_index(ArraySource(image, text), root / "idx", index_key="IVF64,Flat", nprobe=8)
    return root / "idx"


@pytest.fixture
def index(built, tmp_path):
    shutil.copytree(built, tmp_path / "idx")
    return tmp_path / "idx"


@pytest.fixture(scope="module")
def local_exact(built, tmp_path_factory):
    """The local engine's exact float64 scores of both sides (the reference)."""
    copy = tmp_path_factory.mktemp("local-exact") / "idx"
    shutil.copytree(built, copy)
    report = score(copy, **EXACT)
    return report, stored(copy)


def stored(path) -> dict[str, np.ndarray]:
    with open_index(path).store() as s:
        rows = list(s.query("SELECT * FROM scores ORDER BY vec_id"))
    return {c: np.array([r[c] for r in rows], dtype=float) for c in SCORE_COLUMNS}


def assert_same_kl(got, want, rtol):
    for c in KL:
        np.testing.assert_allclose(got[c], want[c], rtol=rtol, atol=rtol, err_msg=c)


def test_exact_both_sides_in_key_blocks_on_ray_equal_local(engine, index, local_exact, monkeypatch):
    monkeypatch.setattr(kl_engine, "KEY_BLOCK", 8192)  # 3 tiles of images per chunk of captions
    report = score(index, engine=engine, **EXACT)
    want_report, want = local_exact
    assert report.engine == "ray" and report.estimator == "exact"
    assert report.chunks_computed == want_report.chunks_computed == 4 and report.chunks_reused == 0
    assert_same_kl(stored(index), want, 1e-9)
    assert not (index / "work").exists()


def test_key_blocks_merged_equal_one_block():
    """Row partials merged over blocks of candidates, and column partials of each block, equal one
    pass over every candidate (float64), in whatever order the blocks arrive."""
    rng = np.random.default_rng(3)
    q, c = rng.standard_normal((300, 16)), rng.standard_normal((1000, 16))
    q, c = q / np.linalg.norm(q, axis=1, keepdims=True), c / np.linalg.norm(c, axis=1, keepdims=True)
    rows, cols = exact_moments(q, c, 50.0, rows=True, cols=True, precision="float64", device="cpu")
    merged_rows, merged_cols = Moments(len(q)), Moments(len(c))
    for c0 in (768, 0, 512, 256):  # out of order, as tasks finish
        r, k = exact_moments(q, c[c0 : c0 + 256], 50.0, rows=True, cols=True, precision="float64", device="cpu")
        merged_rows.merge_all(r)
        merged_cols.merge(slice(c0, c0 + 256), k.max, k.s0, k.s1)
    for got, want, over in ((merged_rows, rows, len(c)), (merged_cols, cols, len(q))):
        mean = np.zeros(len(want.max))
        np.testing.assert_allclose(got.kl(mean, over), want.kl(mean, over), rtol=1e-12)


def test_the_default_estimator_on_ray_equals_local(engine, index, tmp_path):
    """strata (auto's approximate choice) on both sides: the plan and calibration built once by the
    driver, the chunks on the workers; the same numbers and the same held-out check."""
    local = tmp_path / "local"
    shutil.copytree(index, local)
    params = dict(estimator="strata", metrics=["kl", "klr"], batch_size=5000)
    want_report = score(local, **params)
    report = score(index, engine=engine, **params)
    assert_same_kl(stored(index), stored(local), 1e-12)
    assert report.details == want_report.details and report.dots_per_query == want_report.dots_per_query
    assert [(c.column, c.spearman, c.top25_overlap) for c in report.checks] == [
        (c.column, c.spearman, c.top25_overlap) for c in want_report.checks]
    assert report.chunks_computed == 8


def test_mimps_and_paper_on_ray_equal_local(engine, index, tmp_path):
    for name, params in (("mimps", dict(k=32, tail_sample=256, metrics=["kl", "klr"], side="image", batch_size=7000,
                                        check=1000)),
                         ("paper", dict(estimator="paper", paper_sample=0.01, metrics=["kl"], side="text",
                                        batch_size=7000))):
        local = tmp_path / name
        shutil.copytree(index, local)
        want = score(local, **params)
        got = score(index, engine=engine, **params)
        assert got.estimator == want.estimator, name
        cols = [c for c in got.columns if c in KL]
        assert cols, name
        a, b = stored(index), stored(local)
        for c in cols:  # float32 GEMMs (the tail's, the sample's) round as their thread count has them
            np.testing.assert_allclose(a[c], b[c], rtol=1e-6, atol=1e-6, err_msg=f"{name} {c}")


def test_a_killed_worker_costs_only_its_task(engine, index, local_exact, armed, monkeypatch):
    monkeypatch.setattr(kl_engine, "KEY_BLOCK", 8192)
    (armed / "score.task").write_text("")  # the first task to finish kills its worker before returning
    report = score(index, engine=engine, **EXACT)
    assert not (armed / "score.task").exists()  # it fired
    assert report.chunks_computed == 4 and report.chunks_reused == 0  # each chunk once, none lost
    assert_same_kl(stored(index), local_exact[1], 1e-9)  # no tile's partials folded in twice


def test_a_run_interrupted_locally_resumes_on_ray(engine, index, local_exact, monkeypatch):
    from clip_density_index.queries import chunks

    monkeypatch.setattr(chunks, "COLUMNS_EVERY", 0.0)  # the partials written after every chunk
    with exact_pass_killed_at(3), pytest.raises(KeyboardInterrupt):  # the driver's own calls only
        score(index, **EXACT)
    report = score(index, engine=engine, **EXACT)
    assert report.chunks_reused == 2 and report.chunks_computed == 2  # the two chunks done are not resubmitted
    assert_same_kl(stored(index), local_exact[1], 1e-9)


def test_cli_engine_options(engine, index):
    from clip_density_index.cli import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["score", str(index), "--metrics", "kl", "--side", "text", "--estimator", "exact",
                            "--engine", "ray", "-q"])
    assert r.exit_code == 0, r.output
    assert "engine: ray" in r.output
    assert np.isfinite(stored(index)["kl_text"]).all()
    r = runner.invoke(cli, ["score", str(index), "--metrics", "kl", "--address", "auto", "-q"])
    assert r.exit_code != 0 and "--address needs --engine ray" in r.output

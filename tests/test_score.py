"""``score``: the scores table, run records, resume after interruption, --check, parameter errors."""

import json
import math
import shutil

import numpy as np
import pytest

from conftest import clustered_pairs, exact_pass_killed_at
from clip_density_index.indexer.build import build_index
from clip_density_index.indexer.errors import IndexNotFound, InvalidParameter
from clip_density_index.indexer.pool import open_index
from clip_density_index.indexer.sources import ArraySource
from clip_density_index.queries import chunks, estimate
from clip_density_index.queries.accuracy import spearman, top_overlap
from clip_density_index.queries.exact import exact_kl
from clip_density_index.queries.score_params import SCORE_COLUMNS
from clip_density_index.queries.scoring import score

N = 1200


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small IVF index (text and image pools of 1,200 clustered 32-d pairs), built once."""
    image, text = clustered_pairs(N, 32, seed=0)
    root = tmp_path_factory.mktemp("built")
    build_index(ArraySource(image, text), root / "idx", index_key="IVF8,Flat", nprobe=4)
    siglip = ArraySource(image, text, logit_scale=10.0, logit_bias=-10.0, raw_known=False)
    build_index(siglip, root / "siglip")
    return root


@pytest.fixture
def index(built, tmp_path):
    """A private copy of the built index (score writes into its catalog)."""
    shutil.copytree(built / "idx", tmp_path / "idx")
    return tmp_path / "idx"


def table(path, sql):
    with open_index(path).store() as s:
        return list(s.query(sql))


def scores(path):
    rows = table(path, "SELECT * FROM scores ORDER BY vec_id")
    return {c: np.array([r[c] for r in rows], dtype=float if c not in ("uid",) else object) for c in rows[0]}


def computed(cols):
    """The score columns holding values (every public column exists; uncomputed ones are NULL)."""
    return [c for c in SCORE_COLUMNS if not np.isnan(cols[c]).all()]


def test_scores_table_has_every_column_and_the_run_is_recorded(index):
    report = score(index, k=32, tail_sample=128, batch_size=500, check=200, nprobe=8)
    cols = scores(index)
    assert list(cols) == ["uid", "vec_id", *SCORE_COLUMNS]
    assert len(cols["uid"]) == N and list(cols["vec_id"]) == list(range(N))
    assert all(np.isfinite(cols[c]).all() for c in SCORE_COLUMNS)
    pool = open_index(index)
    with pool.store() as s:
        uids = [r["uid"] for r in s.query("SELECT uid FROM samples ORDER BY vec_id")]
    assert list(cols["uid"]) == uids
    # the estimate is close to the exact scores on this small pool (nprobe = nlist: exact top-k)
    for side, other in (("text", "image"), ("image", "text")):
        kl, klr = exact_kl(pool.embeddings(side), pool.embeddings(other), pool.logit_scale)
        assert np.abs(cols[f"kl_{side}"] - kl).mean() < 0.05
        assert np.abs(cols[f"klr_{side}"] - klr).mean() < 0.05
    runs = table(index, "SELECT * FROM score_runs")
    assert len(runs) == 1 and runs[0]["run_id"] == report.run_id == 1
    assert (runs[0]["k"], runs[0]["tail_sample"], runs[0]["exact"], runs[0]["side"]) == (32, 128, False, "both")
    assert runs[0]["logit_scale"] == 100.0 and runs[0]["logit_bias"] is None and runs[0]["nprobe"] == 8
    assert runs[0]["columns"] == list(SCORE_COLUMNS) and runs[0]["duration_s"] > 0
    # report: cost (IVF8, 8 probes: 8 + 8 * 1200 / 8 search, 128 tail, mean, own pair) and timings
    assert report.nprobe == {"text": 8, "image": 8} and report.rescored == {"text": False, "image": False}
    assert report.dots_per_query["text"] == 8 + 8 * N / 8 + 128 + 1 + 1
    assert {"kl_text.search", "kl_text.tail", "kl_text.sql", "closed_form", "check", "total"} <= set(report.seconds)
    assert report.chunks_computed == 6 and report.chunks_reused == 0
    assert not (index / "work").exists()


def test_check_report_and_table(index):
    report = score(index, k=16, tail_sample=64, metrics=["kl", "klr"], side="text", check=300, seed=3)
    assert report.nprobe == {"text": 4}  # the index's own setting
    assert [c.column for c in report.checks] == ["kl_text", "klr_text"]
    for c in report.checks:
        assert c.n == 300 and c.spearman > 0.9 and c.top25_overlap > 0.8 and 0 <= c.mae < c.max_abs_error
    rows = table(index, "SELECT * FROM score_checks ORDER BY column_name")
    assert [(r["column_name"], r["n_checked"], r["run_id"], r["seed"]) for r in rows] == [
        ("kl_text", 300, 1, 3), ("klr_text", 300, 1, 3)]
    assert rows[0]["spearman"] == pytest.approx(report.checks[0].spearman)
    # the check's numbers, recomputed by hand on the same samples
    pool = open_index(index)
    cols = scores(index)
    from clip_density_index.queries.accuracy import check_sample

    ids = check_sample(N, 300, 3)
    kl, _ = exact_kl(pool.embeddings("text")[ids], pool.embeddings("image"), 100.0)
    # the check's truth is computed in float32 (< 1e-4 nats from float64)
    assert report.checks[0].mae == pytest.approx(np.abs(cols["kl_text"][ids] - kl).mean(), abs=1e-5)
    assert list(cols) == ["uid", "vec_id", *SCORE_COLUMNS]
    assert computed(cols) == ["kl_text", "klr_text"]


_real_kl_from_lists = estimate.kl_from_lists


def interrupt_chunk(monkeypatch, number: int) -> list:
    """Make the ``number``-th chunk's SQL step raise KeyboardInterrupt; returns the call log."""
    calls = []
    real = estimate.kl_from_lists

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kw)

    monkeypatch.setattr(estimate, "kl_from_lists", failing)
    return calls


def test_resume_after_interruption(index, tmp_path, monkeypatch):
    fresh = tmp_path / "fresh"
    shutil.copytree(index, fresh)
    params = dict(k=16, tail_sample=64, batch_size=300, metrics=["kl", "klr", "clipscore"])
    real = estimate.kl_from_lists
    calls = interrupt_chunk(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        score(index, **params)
    [work] = (index / "work").iterdir()
    assert sorted(p.name for p in work.glob("*.parquet")) == ["text-000000000000.parquet", "text-000000000300.parquet"]
    assert not table(index, "SELECT * FROM information_schema.tables WHERE table_name = 'scores'")

    calls.clear()
    monkeypatch.setattr(estimate, "kl_from_lists", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    report = score(index, **params)
    assert len(calls) == 8 - 2 and report.chunks_reused == 2 and report.chunks_computed == 6
    assert not (index / "work").exists()

    monkeypatch.setattr(estimate, "kl_from_lists", real)
    score(fresh, **params)
    resumed, uninterrupted = scores(index), scores(fresh)
    for c in ("kl_text", "klr_text", "kl_image", "klr_image", "clipscore"):
        np.testing.assert_array_equal(resumed[c], uninterrupted[c])


def test_a_run_says_when_interrupted_runs_with_other_options_keep_chunks(index, monkeypatch, caplog):
    params = dict(k=16, tail_sample=64, batch_size=300, metrics=["kl"])
    real = estimate.kl_from_lists
    interrupt_chunk(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        score(index, seed=1, **params)
    monkeypatch.setattr(estimate, "kl_from_lists", real)
    with caplog.at_level("WARNING", logger="clip_density_index.queries.scoring"):
        score(index, seed=2, **params)
    [kept] = (index / "work").iterdir()  # seed 1's chunk, not seed 2's
    assert "1 interrupted score run(s) with other options keep their finished chunks" in caplog.text
    assert len(list(kept.glob("*.parquet"))) == 1
    caplog.clear()
    from clip_density_index.indexer import lock

    with lock.sole(kept, "busy"), caplog.at_level("WARNING", logger="clip_density_index.queries.scoring"):  # a run working there
        score(index, seed=3, **params)
    assert "interrupted" not in caplog.text


def test_exact_mode_and_columns_carried_over(index):
    score(index, metrics=["clipscore", "dc"], side="image")
    report = score(index, exact=True, metrics=["kl", "klr"], batch_size=700, precision="float64")
    assert report.k is None and report.dots_per_query == {"text": N, "image": N}
    assert report.estimator == "exact" and report.chunks_computed == 2  # one pass, two caption chunks
    pool = open_index(index)
    cols = scores(index)
    for side, other in (("text", "image"), ("image", "text")):
        kl, klr = exact_kl(pool.embeddings(side), pool.embeddings(other), 100.0)
        np.testing.assert_allclose(cols[f"kl_{side}"], kl, rtol=1e-9)
        np.testing.assert_allclose(cols[f"klr_{side}"], klr, rtol=1e-9)
    assert list(cols) == ["uid", "vec_id", *SCORE_COLUMNS]
    assert computed(cols) == ["kl_text", "kl_image", "klr_text", "klr_image", "dc_image", "clipscore"]
    runs = table(index, "SELECT run_id, exact, columns FROM score_runs ORDER BY run_id")
    assert [(r["run_id"], r["exact"], r["columns"]) for r in runs] == [
        (1, False, ["dc_image", "clipscore"]), (2, True, ["kl_text", "kl_image", "klr_text", "klr_image"])]


def test_siglip_bias_and_unknown_raw_norms(built):
    report = score(built / "siglip", k=N, tail_sample=0, metrics=["kl", "klr", "rawnorm"], side="text")
    assert report.logit_bias == -10.0 and report.logit_scale == 10.0
    pool = open_index(built / "siglip")
    cols = scores(built / "siglip")
    kl, klr = exact_kl(pool.embeddings("text"), pool.embeddings("image"), 10.0, -10.0)
    np.testing.assert_allclose(cols["kl_text"], kl, atol=1e-4)  # k = N: exact
    np.testing.assert_allclose(cols["klr_text"], klr, rtol=1e-9)  # tau_b KLR needs no softmax
    assert np.isnan(cols["rawnorm_text"]).all()  # NULL: the raw embeddings are unknown
    assert table(built / "siglip", "SELECT count(*) AS n FROM scores WHERE rawnorm_text IS NULL")[0]["n"] == N


@pytest.mark.parametrize(
    "kw, value",
    [
        (dict(k=0), "k=0"),
        (dict(k=N + 1), f"k={N + 1}"),
        (dict(logit_scale=-1.0), "-1.0"),
        (dict(logit_scale=0.0), "0.0"),
        (dict(tail_sample=-1), "-1"),
        (dict(tail_sample=N + 1), str(N + 1)),
        (dict(side="caption"), "'caption'"),
        (dict(metrics=["kl", "entropy"]), "'entropy'"),
        (dict(batch_size=0), "0"),
        (dict(nprobe=0), "0"),
        (dict(check=N + 5), str(N + 5)),
        (dict(check=10, metrics=["dc"]), "check=10"),
        (dict(metrics=[]), "metrics is empty"),
        (dict(seed=-1), "-1"),
        (dict(seed=2**63), str(2**63)),
        (dict(device="bogus"), "'bogus'"),
        (dict(logit_scale=1e200), "1e+200"),
        (dict(estimator="softmax"), "'softmax'"),
        (dict(estimator="paper", k=8), "k only apply to the mimps"),
        (dict(exact=True, estimator="mimps"), "contradicts"),
        (dict(estimator="paper", paper_sample=0.0), "paper_sample"),
        (dict(target_overlap=1.5), "target_overlap"),
        (dict(precision="int8"), "'int8'"),
        (dict(estimator="strata", k=5), "k only apply to the mimps"),
        (dict(estimator="exact", strata_target=0.9), "strata_target only apply to the strata"),
        (dict(k=5, max_fraction=0.2), "max_fraction only apply to the strata estimator, not mimps"),
        (dict(estimator="paper", paper_sample=0.001), "paper_sample 0.001 of N=1,200 is 2 candidate(s)"),
    ],
)
def test_bad_parameters_name_the_value(built, kw, value):
    with pytest.raises(InvalidParameter) as e:
        score(built / "idx", **kw)
    assert value in str(e.value)


def test_missing_index(tmp_path):
    with pytest.raises(IndexNotFound, match="nowhere"):
        score(tmp_path / "nowhere")


def test_rank_statistics():
    x = np.array([1.0, 2.0, 2.0, 5.0, 4.0])
    assert spearman(x, x * 3 + 1) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    from scipy.stats import spearmanr

    r = np.random.default_rng(0)
    a, b = r.normal(size=200), r.normal(size=200)
    b[:50] = a[:50]
    a[10:20] = 0.5  # ties
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert top_overlap(np.arange(8.0), np.arange(8.0)) == 1.0
    assert top_overlap(np.arange(8.0), -np.arange(8.0)) == 0.0
    assert top_overlap(np.array([4.0, 3, 2, 1]), np.array([4.0, 1, 2, 3])) == 1.0  # top 1 of 4
    assert math.isnan(spearman(np.ones(5), x))


def test_scores_table_always_has_every_public_column(tmp_path):
    """A run with a few metrics still gives SPEC 11's full schema (NULL where not computed), so
    named queries such as score_correlations run."""
    from conftest import clustered_pairs

    from clip_density_index.indexer.build import build_index
    from clip_density_index.indexer.sources import ArraySource
    from clip_density_index.queries.score_params import SCORE_COLUMNS
    from clip_density_index.queries.scoring import score
    from clip_density_index.queries.sqlrun import run_query, run_sql

    image, text = clustered_pairs(400, 16, seed=5)
    build_index(ArraySource(image, text), tmp_path / "idx")
    score(tmp_path / "idx", metrics=["kl", "klr"], k=16, tail_sample=64)
    table = run_sql(tmp_path / "idx", "SELECT * FROM scores")
    assert table.column_names == ["uid", "vec_id", *SCORE_COLUMNS]
    assert table.column("dc_text").null_count == 400 and table.column("kl_text").null_count == 0
    corr = run_query(tmp_path / "idx", "score_correlations")
    assert corr.num_rows > 0


def test_a_graph_index_reports_its_cost_as_not_counted(tmp_path):
    """HNSW's search cost depends on the data: the run says so instead of NaN (invalid JSON)."""
    from clip_density_index.queries.score_report import report_dict

    image, text = clustered_pairs(600, 16, seed=6)
    build_index(ArraySource(image, text), tmp_path / "idx", index_key="HNSW16")
    report = score(tmp_path / "idx", metrics=["kl"], k=16, tail_sample=64)
    assert report.dots_per_query == {"text": None, "image": None}
    json.dumps(report_dict(report), allow_nan=False)
    stored = table(tmp_path / "idx", "SELECT dots_per_query FROM score_runs")[0]["dots_per_query"]
    assert json.loads(stored) == report.dots_per_query


def test_selecting_by_a_column_never_computed_is_a_clear_error(tmp_path):
    from conftest import clustered_pairs

    from clip_density_index.indexer.build import build_index
    from clip_density_index.indexer.errors import InvalidParameter
    from clip_density_index.indexer.sources import ArraySource
    from clip_density_index.queries.selection import select
    from clip_density_index.queries.sqlrun import run_query

    image, text = clustered_pairs(300, 16, seed=6)
    build_index(ArraySource(image, text), tmp_path / "idx")
    score(tmp_path / "idx", metrics=["kl"], k=16, tail_sample=64)
    with pytest.raises(InvalidParameter, match=r"'dc_text' has no values .*--metrics dc"):
        select(tmp_path / "idx", by="dc_text", top_fraction=0.5)
    with pytest.raises(InvalidParameter, match=r"'klr_image' \(parameter 'column' .*\) has no values .*--metrics klr"):
        run_query(tmp_path / "idx", "top_by_score", column="klr_image")  # not 0 rows, silently
    assert select(tmp_path / "idx", by="kl_text", top_fraction=0.5).kept == 150


def test_auto_picks_the_exact_softmax_for_a_small_pool(tmp_path):
    """auto runs the exact pass (float32 by default on a CPU) and says why; k / tail_sample force mimps."""
    from conftest import clustered_pairs

    from clip_density_index.indexer.build import build_index
    from clip_density_index.indexer.sources import ArraySource

    image, text = clustered_pairs(500, 16, seed=9)
    build_index(ArraySource(image, text), tmp_path / "idx")
    pool = open_index(tmp_path / "idx")
    assert pool.manifest["image_index"] == "Flat"
    report = score(pool, metrics=["kl", "klr"], side="text")
    assert report.exact and report.k is None and report.precision == "float32" and "exact" in report.reason
    assert report.checks == []  # exact: nothing to check unless asked
    kl, klr = exact_kl(pool.embeddings("text"), pool.embeddings("image"), 100.0)
    cols = scores(tmp_path / "idx")
    np.testing.assert_allclose(cols["kl_text"], kl, atol=1e-4)
    np.testing.assert_allclose(cols["klr_text"], klr, atol=1e-4)
    forced = score(pool, metrics=["kl"], side="text", k=16, tail_sample=32)
    assert not forced.exact and forced.k == 16 and forced.estimator == "mimps"
    assert forced.checks and forced.checks[0].n == 125  # approximate: checked on a quarter of 500


def test_a_second_score_with_the_same_options_refuses_while_the_first_runs(index, monkeypatch):
    """Both would use one chunk folder, and the first to finish would delete it under the other (a
    traceback)."""
    from clip_density_index.indexer.errors import IndexBusy

    params = dict(k=16, tail_sample=64, batch_size=300, metrics=["kl"])
    real = estimate.kl_from_lists
    refused = []

    def second_run_meanwhile(*args, **kw):
        if not refused:
            with pytest.raises(IndexBusy, match="A score with the same options is already running") as e:
                score(index, **params)
            refused.append(str(e.value))
        return real(*args, **kw)

    monkeypatch.setattr(estimate, "kl_from_lists", second_run_meanwhile)
    report = score(index, **params)
    assert refused and report.chunks_computed == 8 and not (index / "work").exists()  # 4 per side


def test_paper_estimator_equals_an_independent_numpy_version(index):
    """The paper's filter: a softmax over ceil(0.05 N) candidates drawn with replacement per side."""
    from scipy.special import logsumexp

    from clip_density_index.queries.scorers import paper_sample_ids

    report = score(index, estimator="paper", paper_sample=0.05, metrics=["kl", "klr"], precision="float64",
                   check=300)
    assert report.estimator == "paper" and report.dots_per_query == {"text": 60, "image": 60}
    assert len(report.checks) == 4 and all(c.n == 300 for c in report.checks)
    pool, cols = open_index(index), scores(index)
    for side, other in (("text", "image"), ("image", "text")):
        ids = paper_sample_ids(N, 0.05, 0, side)
        assert len(ids) == 60
        s = 100.0 * pool.embeddings(side).astype(np.float64) @ pool.embeddings(other)[ids].astype(np.float64).T
        lse = logsumexp(s, axis=1)
        p = np.exp(s - lse[:, None])
        np.testing.assert_allclose(cols[f"kl_{side}"], (p * s).sum(1) - lse + math.log(60), rtol=1e-9)
        np.testing.assert_allclose(cols[f"klr_{side}"], lse - math.log(60) - s.mean(1), rtol=1e-9)
    assert not np.array_equal(paper_sample_ids(N, 0.05, 0, "text"), paper_sample_ids(N, 0.05, 0, "image"))
    assert np.unique(paper_sample_ids(N, 0.5, 0, "text")).size < 600  # drawn with replacement


def test_held_out_interval_covers_the_error_on_the_whole_pool(index):
    """The check's bootstrap interval (300 of 1,200 rows) holds the agreement measured on all rows."""
    from clip_density_index.queries.accuracy import compare

    report = score(index, k=8, tail_sample=32, nprobe=1, metrics=["kl", "klr"], check=300, seed=5)
    pool, cols = open_index(index), scores(index)
    covered = 0
    for c in report.checks:
        side = c.column.split("_")[1]
        other = "image" if side == "text" else "text"
        kl, klr = exact_kl(pool.embeddings(side), pool.embeddings(other), 100.0)
        whole = compare(c.column, cols[c.column], kl if c.column.startswith("kl_") else klr, resamples=0)
        assert c.spearman_ci[0] <= c.spearman <= c.spearman_ci[1] and c.mae_ci[0] <= c.mae <= c.mae_ci[1]
        covered += c.spearman_ci[0] <= whole.spearman <= c.spearman_ci[1]
        covered += c.mae_ci[0] <= whole.mae <= c.mae_ci[1]
    assert covered >= 7  # of 8 intervals (95% each)
    rows = table(index, "SELECT * FROM score_checks ORDER BY column_name")
    assert all(r["spearman_lo"] <= r["spearman"] <= r["spearman_hi"] for r in rows)
    run = table(index, "SELECT estimator, reason FROM score_runs")[0]
    assert run == {"estimator": "mimps", "reason": "k / tail_sample / nprobe given"}


def test_a_broken_estimator_is_caught_by_its_own_check(index, monkeypatch):
    """A corrupted tail (R drawn from the candidates least like any query, so w * sum is far off)
    must show in the held-out check: the run reports its targets missed."""
    good = score(index, k=32, tail_sample=256, nprobe=8, metrics=["kl"], side="text", check=300)
    real = estimate.draw_tail

    def biased(n, m, seed):
        return np.sort(real(n, n, seed)[: m // 4])  # the lowest ids only: not uniform

    monkeypatch.setattr(estimate, "draw_tail", biased)
    bad = score(index, k=2, tail_sample=256, nprobe=1, metrics=["kl"], side="text", check=300)
    assert bad.checks[0].spearman < good.checks[0].spearman - 0.02
    assert bad.targets_met is False and bad.checks[0].spearman_ci[1] < 0.999


def test_runs_with_other_sides_or_metrics_do_not_share_a_work_folder(index, monkeypatch):
    """The folder key held neither the side nor the metrics: these two refused each other."""
    from clip_density_index.indexer import lock
    from clip_density_index.queries.score_params import resolve_params as _resolve, work_name as _work_name

    pool = open_index(index)
    common = dict(estimator="mimps", k=None, tail_sample=None, logit_scale=None, logit_bias=None, seed=0,
                  batch_size=None, nprobe=None, check=None, precision=None, paper_sample=0.002,
                  target_spearman=0.999, target_overlap=0.99, device="cpu")
    a = _resolve(pool, side="text", metrics=["kl"], **common)
    b = _resolve(pool, side="image", metrics=["dw", "kl"], **common)
    assert _work_name(pool, a) != _work_name(pool, b)
    work = pool.paths.work_dir(_work_name(pool, a))
    work.mkdir(parents=True)
    with lock.sole(work, "busy"):  # a text-side run holds its folder: the image-side one still runs
        score(index, side="image", metrics=["dw", "kl"], k=8, tail_sample=16)


def test_an_empty_chunk_left_by_a_power_loss_is_computed_again(index, monkeypatch):
    params = dict(k=16, tail_sample=64, batch_size=300, metrics=["kl"], side="text", check=100)
    interrupt_chunk(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        score(index, **params)
    [work] = (index / "work").iterdir()
    first = work / "text-000000000000.parquet"
    first.write_bytes(b"")  # written but never reached the disk
    monkeypatch.setattr(estimate, "kl_from_lists", _real_kl_from_lists)
    report = score(index, **params)
    assert report.chunks_reused == 1 and report.chunks_computed == 3
    assert np.isfinite(scores(index)["kl_text"]).all()


def test_info_shows_the_accuracy_the_last_run_measured(index):
    from clip_density_index.indexer.info import index_info

    report = score(index, k=8, tail_sample=32, metrics=["kl"], side="text", check=100)
    checks = index_info(index)["last_score_run"]["checks"]
    assert [c["column_name"] for c in checks] == ["kl_text"]
    assert checks[0]["spearman"] == pytest.approx(report.checks[0].spearman)
    assert checks[0]["spearman_lo"] <= checks[0]["spearman"] <= checks[0]["spearman_hi"]


def test_an_interrupted_store_leaves_the_old_scores_and_no_half_table(index, monkeypatch):
    from clip_density_index.indexer.store import Store

    score(index, metrics=["dc"], side="text")
    before = scores(index)["dc_text"]
    real = Store.run

    def dying(self, name, **params):
        if name == "score_run_insert":
            raise KeyboardInterrupt("killed during the final store")
        return real(self, name, **params)

    monkeypatch.setattr(Store, "run", dying)
    with pytest.raises(KeyboardInterrupt):
        score(index, metrics=["dc", "clipscore"], side="text")
    names = [r["table_name"] for r in table(index, "SELECT table_name FROM information_schema.tables")]
    assert "scores__new" not in names and "scores" in names
    np.testing.assert_array_equal(scores(index)["dc_text"], before)
    assert np.isnan(scores(index)["clipscore"]).all()


def test_strata_estimator_checks_itself_and_equals_exact_at_full_budget(index):
    report = score(index, estimator="strata", metrics=["kl", "klr"], check=300)
    assert report.estimator == "strata" and len(report.checks) == 4
    for side in ("text", "image"):
        d = report.details[side]
        assert d["lists"] >= 2 and d["gamma"] >= 0 and 0 < d["scanned_fraction"] <= 1
        assert d["calibration_rows"] > 0 and report.dots_per_query[side] > 0
    run = table(index, "SELECT estimator, details FROM score_runs")[0]
    assert run["estimator"] == "strata" and json.loads(run["details"])["text"]["lists"] == report.details["text"]["lists"]
    full = score(index, estimator="strata", metrics=["kl", "klr"], strata_target=1.0, max_fraction=1.0, check=300)
    assert full.details["text"]["scanned_fraction"] == 1.0
    pool, cols = open_index(index), scores(index)
    for side, other in (("text", "image"), ("image", "text")):
        kl, klr = exact_kl(pool.embeddings(side), pool.embeddings(other), 100.0)
        np.testing.assert_allclose(cols[f"kl_{side}"], kl, atol=1e-4)
        np.testing.assert_allclose(cols[f"klr_{side}"], klr, atol=1e-4)
    assert full.targets_met


def test_calibration_rows_are_disjoint_from_the_held_out_rows():
    from clip_density_index.queries.accuracy import check_sample
    from clip_density_index.queries.scorers import calibration_ids

    for n, check in ((1200, 300), (50_000, 4000)):
        cal = calibration_ids(n, 512, check, 7, "text")
        assert len(cal) == min(512, (n - check) // 2) and not set(cal) & set(check_sample(n, check, 7))


def test_auto_times_both_estimators_above_its_threshold(index, monkeypatch):
    from clip_density_index.indexer import defaults

    monkeypatch.setattr(defaults, "AUTO_EXACT_BELOW", 0)
    report = score(index, metrics=["kl"], side="text")
    assert report.estimator in ("exact", "strata") and "predicted" in report.reason
    assert "s exact vs" in report.reason and "s strata" in report.reason


def test_auto_falls_back_to_exact_when_its_approximation_misses_the_targets(index, monkeypatch):
    import clip_density_index.queries.scoring as qs

    monkeypatch.setattr(qs, "_choose", lambda pool, p, device: ("strata", "strata: predicted faster (test)"))
    report = score(index, metrics=["kl", "klr"], side="text", target_spearman=1.0, precision="float64")
    assert report.estimator == "exact" and "missed the targets" in report.reason
    runs = table(index, "SELECT estimator FROM score_runs")
    assert [r["estimator"] for r in runs] == ["exact"]  # the strata run stored nothing
    pool, cols = open_index(index), scores(index)
    kl, _ = exact_kl(pool.embeddings("text"), pool.embeddings("image"), 100.0)
    np.testing.assert_allclose(cols["kl_text"], kl, rtol=1e-9)
    assert not (index / "work").exists()
    # asked for by name, strata keeps its own result and says the targets were missed
    named = score(index, estimator="strata", metrics=["kl"], side="text", target_spearman=1.0)
    assert named.estimator == "strata" and named.targets_met is False


def test_a_failed_checkpoint_after_the_commit_says_the_scores_are_stored(index, monkeypatch, caplog):
    """A full disk at the final checkpoint: the run is committed (write-ahead log), so score must
    report success with a warning, not an error (it printed a DuckDB error and exited 1)."""
    import duckdb

    from clip_density_index.indexer.store import Store

    real = Store.__enter__

    class Con:
        def __init__(self, con):
            self._con = con

        def execute(self, sql, *a, **kw):
            if sql == "CHECKPOINT":
                raise duckdb.IOException("IO Error: Could not write file: No space left on device")
            return self._con.execute(sql, *a, **kw)

        def __getattr__(self, name):
            return getattr(self._con, name)

    def entering(self):
        s = real(self)
        if not self.read_only:
            self.con = Con(self.con)
        return s

    monkeypatch.setattr(Store, "__enter__", entering)
    with caplog.at_level("WARNING", logger="clip_density_index.queries.scoring"):
        report = score(index, metrics=["dc"], side="text")
    monkeypatch.undo()
    assert "the scores are stored (run 1)" in caplog.text
    assert report.run_id == 1 and not np.isnan(scores(index)["dc_text"]).all()


def test_an_interrupted_exact_run_resumes_with_one_running_column_file(index, monkeypatch):
    """The images' column partials are folded into one running file (O(n) on disk), and a resumed
    run equals an uninterrupted one."""
    monkeypatch.setattr(chunks, "COLUMNS_EVERY", 0.0)  # the running file written after every chunk
    params = dict(estimator="exact", metrics=["kl", "klr"], batch_size=300, precision="float64")
    with exact_pass_killed_at(3), pytest.raises(KeyboardInterrupt):
        score(index, **params)
    [work] = (index / "work").iterdir()
    assert sorted(f.name for f in work.glob("*.parquet")) == [
        "imagecols.parquet", "text-000000000000.parquet", "text-000000000300.parquet"]
    (work / "text-000000000300.parquet").unlink()  # rows lost after their columns were folded in
    report = score(index, **params)
    assert report.chunks_reused == 1 and report.chunks_computed == 3
    resumed = scores(index)
    fresh = index.parent / "fresh"
    shutil.copytree(index, fresh)
    score(fresh, **params)
    pool = open_index(index)
    for side, other in (("text", "image"), ("image", "text")):
        kl, klr = exact_kl(pool.embeddings(side), pool.embeddings(other), 100.0)
        np.testing.assert_allclose(resumed[f"kl_{side}"], kl, rtol=1e-9)
        np.testing.assert_allclose(resumed[f"klr_{side}"], klr, rtol=1e-9)
        np.testing.assert_allclose(resumed[f"kl_{side}"], scores(fresh)[f"kl_{side}"], rtol=1e-12)


def test_column_partials_written_only_every_columns_every_seconds_are_counted_once(index, monkeypatch):
    """With the running file written only at the end of the pass, a run killed in the middle leaves
    its rows files but no partials: the resumed run computes every chunk's columns again (folding
    each in once) and equals the exact reference; a pass that ends writes the file."""
    monkeypatch.setattr(chunks, "COLUMNS_EVERY", 1e9)
    params = dict(estimator="exact", metrics=["kl", "klr"], batch_size=300, precision="float64")
    with exact_pass_killed_at(3), pytest.raises(KeyboardInterrupt):
        score(index, **params)
    [work] = (index / "work").iterdir()
    assert sorted(f.name for f in work.glob("*.parquet")) == ["text-000000000000.parquet",
                                                              "text-000000000300.parquet"]
    saved, real_write = [], chunks.write_columns
    monkeypatch.setattr(chunks, "write_columns", lambda *a: saved.append(sorted(a[2])) or real_write(*a))
    report = score(index, **params)
    assert report.chunks_reused == 0 and report.chunks_computed == 4
    assert saved == [[0, 300, 600, 900]]  # once, at the end of the pass
    pool = open_index(index)
    got = scores(index)
    for side, other in (("text", "image"), ("image", "text")):
        kl, klr = exact_kl(pool.embeddings(side), pool.embeddings(other), 100.0)
        np.testing.assert_allclose(got[f"kl_{side}"], kl, rtol=1e-9)
        np.testing.assert_allclose(got[f"klr_{side}"], klr, rtol=1e-9)


def test_auto_never_recomputes_an_exact_run_whose_check_misses(index, monkeypatch):
    report = score(index, metrics=["kl"], side="text", check=200, target_spearman=1.0, precision="bfloat16")
    assert report.estimator == "exact" and "missed" not in report.reason and report.chunks_computed == 1

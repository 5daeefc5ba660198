"""The stratified estimator (queries/strata.py, sql/kl_strata.sql): plan layout, consistency with the
exact KL at full budget (SPEC 3.2), calibration, widening."""

import duckdb
import numpy as np
import pytest
import torch

from conftest import clustered_pairs
from conftest import unit32 as unit
from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.queries import strata
from clip_density_index.queries.exact import exact_kl

A = 100.0


@pytest.fixture(scope="module")
def pool():
    """Texts are the queries, images the candidates (2,000 each, d = 32)."""
    image, text = clustered_pairs(2000, 32, seed=1)
    return unit(text), unit(image)


@pytest.fixture(scope="module")
def plan(pool):
    text, image = pool
    return strata.build_plan(image, seed=0, queries=text)


def scores(table, n, b=None):
    with duckdb.connect() as con:
        res = strata.strata_kl(con, table, n, b)
    return res.column("kl").to_numpy(), res.column("klr").to_numpy()


def test_plan_is_a_list_major_permutation(pool, plan):
    text, image = pool
    n = len(image)
    assert plan.n == n and plan.n_lists == strata.default_lists(n) or plan.n_lists <= strata.default_lists(n)
    assert np.array_equal(np.sort(plan.order), np.arange(n))
    assert plan.offsets[0] == 0 and plan.offsets[-1] == n and (plan.sizes > 0).all()
    np.testing.assert_array_equal(plan.vectors, image[plan.order])
    for lst in (0, plan.n_lists // 2, plan.n_lists - 1):
        rows = plan.order[plan.offsets[lst] : plan.offsets[lst + 1]]
        assert (plan.list_of[rows] == lst).all()
        np.testing.assert_allclose(plan.means[lst], image[rows].astype(np.float64).mean(0), atol=1e-12)
    np.testing.assert_allclose(plan.cand_sum, image.astype(np.float64).sum(0), atol=1e-9)
    assert (plan.var_along >= 0).all() and (plan.var_rest >= 0).all()


@pytest.mark.parametrize("b", [None, -10.0])
def test_full_budget_equals_exact(pool, plan, b):
    """SPEC 3.2: every list scanned, the model part is zero and the result is section 2's KL."""
    text, image = pool
    q = text[:300]
    table = strata.partials(plan, q, A, gamma=1.0, target=1.0, max_fraction=1.0, dtype=torch.float64)
    assert (table.column("scanned_n").to_numpy() == plan.n).all()
    assert (table.column("model_sum").to_numpy() == 0).all()
    assert strata.scanned_fraction(table, plan.n) == 1.0
    kl, klr = scores(table, plan.n, b)
    ekl, eklr = exact_kl(q, image, A, b, device="cpu")
    np.testing.assert_allclose(kl, ekl, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(klr, eklr, rtol=1e-9, atol=1e-9)


def test_full_budget_float16_candidates(pool):
    """A float16 pool stays float16 in the plan; full budget matches exact_kl on the same values."""
    text, image = pool
    half = image[:1000].astype(np.float16)
    p = strata.build_plan(half, seed=3, n_lists=20)
    assert p.vectors.dtype == np.float16
    table = strata.partials(p, text[:100], A, gamma=1.0, target=1.0, max_fraction=1.0, dtype=torch.float64)
    kl, klr = scores(table, p.n)
    ekl, eklr = exact_kl(text[:100], half, A, device="cpu")
    np.testing.assert_allclose(kl, ekl, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(klr, eklr, rtol=1e-9, atol=1e-9)
    # float32 GEMMs: as close as the float32 exact pass
    table32 = strata.partials(p, text[:100], A, gamma=1.0, target=1.0, max_fraction=1.0)
    kl32, _ = scores(table32, p.n)
    assert np.abs(kl32 - ekl).max() < 1e-3


def test_partial_budget_scans_less_and_ranks_like_exact():
    """The default budget on a small synthetic CLIP-like world (2,000 samples, d = 512): a fraction
    of the pairs, calibrated model for the rest, rankings close to exact (the accuracy at scale is
    measured by bench/strata.py)."""
    from bench.common import world
    from clip_density_index.queries.accuracy import spearman

    _, image, text = world(2000, "calibrated")
    p = strata.build_plan(image, seed=0, queries=text)
    rng = np.random.default_rng(0)
    ids = rng.permutation(2000)
    calib, qi = ids[:200], np.sort(ids[200:600])
    gamma = strata.calibrate(p, text[calib], A, own_ids=calib)
    assert 0.0 <= gamma <= 4.0
    table = strata.partials(p, text[qi], A, gamma=gamma, query_ids=qi + 7, own_ids=qi)
    assert table.column("query").to_pylist()[:2] == (qi[:2] + 7).tolist()
    frac = strata.scanned_fraction(table, p.n)
    assert 0 < frac < 0.6
    assert (table.column("model_sum").to_numpy() > 0).any()
    kl, klr = scores(table, p.n)
    ekl, eklr = exact_kl(text[qi], image, A, device="cpu")
    assert spearman(kl, ekl) > 0.99 and spearman(klr, eklr) > 0.99
    assert np.isfinite(kl).all() and np.isfinite(klr).all()


def test_calibration_fits_the_scale(pool, plan):
    """The fitted gamma errs less on its rows than a broken one; a refit from the same sums is free."""
    text, _ = pool
    sums = strata.list_sums(plan, text[1000:1256], A)
    gamma = strata.calibrate(plan, None, A, sums=sums)
    good = strata.calibration_error(plan, sums, gamma)
    assert good < strata.calibration_error(plan, sums, gamma + 2.0)
    assert good < strata.calibration_error(plan, sums, 0.0) or gamma < 0.1
    # exact sums equal the exact KL of those queries
    lz, es = strata._exact_moments(sums)
    _, klr = exact_kl(text[1000:1256], np.asarray(plan.vectors), A, device="cpu")
    np.testing.assert_allclose(lz - np.log(plan.n) - sums.mean_s, klr, atol=1e-4)


def test_widen_rescans_only_the_flagged_rows(pool, plan):
    text, image = pool
    q = text[:50]
    table = strata.partials(plan, q, A, gamma=1.0, target=0.5, max_fraction=0.1, dtype=torch.float64)
    flags = np.zeros(50, bool)
    flags[[3, 17, 40]] = True
    wide = strata.widen(plan, table, q, A, gamma=1.0, flags=flags, target=1.0, max_fraction=1.0,
                        dtype=torch.float64)
    assert wide.schema == table.schema
    for name in table.column_names:
        np.testing.assert_array_equal(wide.column(name).to_numpy()[~flags], table.column(name).to_numpy()[~flags])
    assert (wide.column("scanned_n").to_numpy()[flags] == plan.n).all()
    kl, _ = scores(wide, plan.n)
    ekl, _ = exact_kl(q[flags], image, A, device="cpu")
    np.testing.assert_allclose(kl[flags], ekl, rtol=1e-9)
    with pytest.raises(InvalidParameter):
        strata.widen(plan, table, q[:10], A, gamma=1.0, flags=flags, target=1.0)


def test_own_pair_list_is_always_scanned(pool, plan):
    text, _ = pool
    q = text[:100]
    own = np.arange(100)
    narrow = strata.partials(plan, q, A, gamma=1.0, target=1e-6, max_fraction=1e-6)
    forced = strata.partials(plan, q, A, gamma=1.0, target=1e-6, max_fraction=1e-6, own_ids=own)
    sizes = plan.sizes
    own_size = sizes[plan.list_of[own]]
    n0, n1 = narrow.column("scanned_n").to_numpy(), forced.column("scanned_n").to_numpy()
    assert ((n1 == n0) | (n1 == n0 + own_size)).all() and (n1 > n0).any()
    with pytest.raises(InvalidParameter):
        strata.partials(plan, q, A, gamma=1.0, own_ids=own[:5])


def test_bad_arguments(pool, plan):
    text, image = pool
    with pytest.raises(InvalidParameter):
        strata.partials(plan, text[:5], -1.0, gamma=1.0)
    with pytest.raises(InvalidParameter):
        strata.partials(plan, text[:5], A, gamma=1.0, target=0.0)
    with pytest.raises(InvalidParameter):
        strata.build_plan(image[:10], n_lists=11)
    empty = strata.partials(plan, text[:0], A, gamma=1.0)
    assert empty.num_rows == 0 and strata.scanned_fraction(empty, plan.n) == 0.0
    with duckdb.connect() as con:
        assert strata.strata_kl(con, empty, plan.n).num_rows == 0

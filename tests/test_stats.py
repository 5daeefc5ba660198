"""indexer.stats: streaming statistics against numpy / scipy on the same data."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

import clip_density_index.indexer.stats as stats_mod
from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.indexer.stats import StatsAccumulator, whitened_loglik, whitening

N, D = 600, 12


def raw_data(
    n: int = N, d: int = D, seed: int = 0, offset: float = 1.0, well_conditioned: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, v, norms): correlated raw vectors with ||mean|| / ||std|| ~ offset, their unit vectors
    and norms. The covariance has condition number ~1e4, or ~4 when well_conditioned."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d)) / np.sqrt(d)
    if well_conditioned:
        A = np.eye(d) + 0.3 * A
    mean_dir = rng.standard_normal(d)
    u = rng.standard_normal((n, d)) @ A.T
    u += offset * np.linalg.norm(u.std(axis=0)) * mean_dir / np.linalg.norm(mean_dir)
    norms = np.linalg.norm(u, axis=1)
    return u, u / norms[:, None], norms


def accumulate(v, norms, splits, raw: bool) -> StatsAccumulator:
    acc = StatsAccumulator(v.shape[1], raw=raw)
    for part in np.split(np.arange(len(v)), splits):
        acc.update(v[part], norms[part] if raw else None)
    return acc


SPLITS = [[], [1], [7, 100, 101, 350], list(range(25, N, 25)), [N - 1]]


def test_doctests():
    assert doctest.testmod(stats_mod).failed == 0


@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("raw", [True, False])
def test_matches_numpy(splits, raw):
    u, v, norms = raw_data()
    acc = accumulate(v, norms, splits, raw)
    assert acc.count == N
    s = acc.finalize(ridge=0.0)
    assert all(a.dtype == np.float64 for a in s.values())
    np.testing.assert_allclose(s["mean"], v.mean(axis=0), rtol=0, atol=1e-13)
    np.testing.assert_allclose(s["sum"], v.sum(axis=0), rtol=0, atol=1e-11)
    np.testing.assert_allclose(s["cov"], np.cov(v, rowvar=False, ddof=1), rtol=0, atol=1e-13)
    if raw:
        np.testing.assert_allclose(s["raw_mean"], u.mean(axis=0), rtol=0, atol=1e-13)
        np.testing.assert_allclose(s["raw_cov"], np.cov(u, rowvar=False, ddof=1), rtol=0, atol=1e-13)
        src = u
        assert acc.whiten_source == "raw"
    else:
        assert "raw_mean" not in s and "raw_cov" not in s
        src = v
        assert acc.whiten_source == "normalised"
    np.testing.assert_allclose(s["whiten_mean"], src.mean(axis=0), atol=1e-13)
    S = np.cov(src, rowvar=False)
    W_ref = np.real(scipy.linalg.inv(scipy.linalg.sqrtm(S)))
    np.testing.assert_allclose(s["whiten"], W_ref, rtol=1e-7, atol=1e-7 * np.abs(W_ref).max())
    assert s["whiten_logdet"].shape == ()
    np.testing.assert_allclose(s["whiten_logdet"], -0.5 * np.linalg.slogdet(S)[1], rtol=1e-10)


def test_batch_splits_agree():
    _, v, norms = raw_data()
    results = [accumulate(v, norms, splits, raw=True).finalize() for splits in SPLITS]
    for r in results[1:]:
        assert r.keys() == results[0].keys()
        for name in r:
            np.testing.assert_allclose(r[name], results[0][name], rtol=1e-10, atol=1e-13)


def test_whitening_gives_identity():
    u, v, norms = raw_data(n=5000, well_conditioned=True)
    assert np.linalg.cond(np.cov(u, rowvar=False)) < 10
    s = accumulate(v, norms, [1000, 2500], raw=True).finalize(ridge=1e-9)
    W = s["whiten"]
    np.testing.assert_allclose(W, W.T, atol=0)
    np.testing.assert_allclose(W @ s["raw_cov"] @ W, np.eye(D), atol=1e-7)
    z = (u - s["whiten_mean"]) @ W
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(D), atol=1e-7)


def test_ridge_is_relative_to_the_mean_eigenvalue():
    _, v, _ = raw_data()
    S = np.cov(v, rowvar=False)
    ridge = 0.1
    W, logdet = whitening(S, ridge)
    S_r = S + ridge * np.trace(S) / D * np.eye(D)
    np.testing.assert_allclose(W @ S_r @ W, np.eye(D), atol=1e-10)
    np.testing.assert_allclose(logdet, -0.5 * np.linalg.slogdet(S_r)[1], rtol=1e-12)
    # scale invariance: the ridge does not depend on the units
    W2, _ = whitening(100.0 * S, ridge)
    np.testing.assert_allclose(W2 * 10.0, W, rtol=1e-10)


def test_singular_covariance_needs_a_ridge():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, D))  # n < d: rank 4
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    acc = StatsAccumulator(D, raw=False)
    acc.update(x)
    with pytest.raises(InvalidParameter, match="singular"):
        acc.finalize(ridge=0.0)
    s = acc.finalize(ridge=1e-3)
    assert np.all(np.isfinite(s["whiten"])) and np.isfinite(s["whiten_logdet"])


def test_loglik_equals_scipy_gaussian():
    u, v, norms = raw_data()
    acc = accumulate(v, norms, [200], raw=True)
    s = acc.finalize(ridge=0.0)
    ref = scipy.stats.multivariate_normal(mean=u.mean(axis=0), cov=np.cov(u, rowvar=False)).logpdf(u)
    ll = whitened_loglik(u, s["whiten_mean"], s["whiten"], s["whiten_logdet"])
    assert ll.shape == (N,) and ll.dtype == np.float64
    np.testing.assert_allclose(ll, ref, rtol=1e-9, atol=1e-9)
    one = whitened_loglik(u[3], s["whiten_mean"], s["whiten"], s["whiten_logdet"])
    np.testing.assert_allclose(one, ref[3], rtol=1e-9)


def test_loglik_on_normalised_vectors():
    _, v, _ = raw_data()
    acc = StatsAccumulator(D, raw=False)
    acc.update(v.astype(np.float32))
    s = acc.finalize(ridge=0.0)
    v32 = v.astype(np.float32).astype(np.float64)
    ref = scipy.stats.multivariate_normal(v32.mean(axis=0), np.cov(v32, rowvar=False)).logpdf(v32)
    np.testing.assert_allclose(whitened_loglik(v32, s["whiten_mean"], s["whiten"], s["whiten_logdet"]),
                               ref, rtol=1e-8)


def test_shifted_accumulation_is_stable_for_large_means():
    # mean 1e4 times the spread: the naive S2 - n mu mu^T loses ~8 of float64's 16 digits
    u, v, norms = raw_data(n=2000, offset=1e4)
    s = accumulate(v, norms, [500, 1500], raw=True).finalize(ridge=0.0)
    ref = np.cov(u, rowvar=False)
    np.testing.assert_allclose(s["raw_cov"], ref, rtol=0, atol=1e-9 * np.abs(ref).max())


def test_float16_input():
    _, v, _ = raw_data()
    v16 = v.astype(np.float16)
    acc = StatsAccumulator(D, raw=False)
    acc.update(v16)
    s = acc.finalize()
    np.testing.assert_allclose(s["mean"], v16.astype(np.float64).mean(axis=0), atol=1e-14)


def test_input_checks():
    _, v, norms = raw_data(n=10)
    with pytest.raises(InvalidParameter, match="raw norms"):
        StatsAccumulator(D, raw=True).update(v)
    with pytest.raises(InvalidParameter, match="raw=False"):
        StatsAccumulator(D, raw=False).update(v, norms)
    with pytest.raises(InvalidParameter, match=r"\(b, 12\)"):
        StatsAccumulator(D, raw=False).update(v[:, :5])
    with pytest.raises(InvalidParameter, match=r"\(10,\)"):
        StatsAccumulator(D, raw=True).update(v, norms[:4])
    acc = StatsAccumulator(D, raw=False)
    acc.update(v[:1])
    acc.update(v[:0])  # empty batches are fine
    with pytest.raises(InvalidParameter, match="at least 2"):
        acc.finalize()
    with pytest.raises(InvalidParameter, match="ridge"):
        whitening(np.eye(3), -1.0)
    with pytest.raises(InvalidParameter, match="shapes"):
        whitened_loglik(np.zeros((2, 3)), np.zeros(4), np.eye(4), 0.0)


def test_float32_precision_is_close_to_exact():
    """The builder's fast mode: float32 block products, float64 accumulation."""
    rng = np.random.default_rng(3)
    u = rng.normal(size=(20_000, 48)) * rng.uniform(0.5, 2.0, 48) + rng.normal(size=48) * 3
    norms = np.linalg.norm(u, axis=1)
    v = u / norms[:, None]
    fast = StatsAccumulator(48, raw=True, precision="float32")
    for s in range(0, len(u), 7000):
        fast.update(v[s:s + 7000], norms[s:s + 7000])
    got = fast.finalize()
    for name, ref in (("cov", np.cov(v, rowvar=False)), ("raw_cov", np.cov(u, rowvar=False))):
        err = np.abs(got[name] - ref).max() / np.abs(ref).max()
        assert err < 1e-5, (name, err)
    # the sums and means are float64 in every precision
    np.testing.assert_allclose(got["raw_mean"], u.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got["mean"], v.mean(0), rtol=1e-10, atol=1e-12)
    with pytest.raises(InvalidParameter, match="precision"):
        StatsAccumulator(4, raw=False, precision="half")


def test_covariance_of_a_row_subset_and_exact_means():
    """``cov_rows``: the covariances are those of the chosen rows only; means and sums stay exact."""
    u, v, norms = raw_data(n=900)
    rng = np.random.default_rng(3)
    acc = StatsAccumulator(D, raw=True)
    picked = []
    for part in np.split(np.arange(900), [250, 600]):
        rows = np.flatnonzero(rng.random(len(part)) < 0.3)
        acc.update(v[part], norms[part], cov_rows=rows)
        picked.append(part[rows])
    sub = np.concatenate(picked)
    s = acc.finalize(ridge=0.0)
    assert acc.count == 900 and acc.cov_count == len(sub) == int(s["cov_rows"]) < 400
    np.testing.assert_allclose(s["mean"], v.mean(axis=0), rtol=0, atol=1e-13)
    np.testing.assert_allclose(s["raw_mean"], u.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s["cov"], np.cov(v[sub], rowvar=False, ddof=1), rtol=0, atol=1e-13)
    np.testing.assert_allclose(s["raw_cov"], np.cov(u[sub], rowvar=False, ddof=1), rtol=1e-10, atol=1e-12)
    # ... and the subset's covariance is an estimate of the whole pool's, not something else
    full = np.cov(v, rowvar=False, ddof=1)
    assert np.linalg.norm(s["cov"] - full) < 0.25 * np.linalg.norm(full)


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_merged_parts_give_the_statistics_of_the_whole(raw, precision):
    """What workers accumulate on parts of the pool, merged in order, is what one accumulator sees
    (each part shifted by its own first rows: the large offset makes a wrong shift visible; well
    conditioned, so that float32's rounding is not amplified by the whitening)."""
    u, v, norms = raw_data(offset=30.0, well_conditioned=True)
    whole = StatsAccumulator(D, raw=raw, precision=precision)
    whole.update(v, norms if raw else None)
    merged = StatsAccumulator(D, raw=raw, precision=precision)
    for part in np.split(np.arange(N), [1, 150, 151, 420]):
        acc = StatsAccumulator(D, raw=raw, precision=precision)
        acc.update(v[part], norms[part] if raw else None)
        merged.merge(acc)
    merged.merge(StatsAccumulator(D, raw=raw, precision=precision))  # an empty part changes nothing
    assert merged.count == N and merged.cov_count == N
    want, got = whole.finalize(ridge=0.0), merged.finalize(ridge=0.0)
    assert got.keys() == want.keys()
    rtol = 1e-9 if precision == "float64" else 1e-4
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=rtol * np.abs(want[name]).max(),
                                   err_msg=name)


def test_merge_refuses_statistics_of_another_kind():
    with pytest.raises(InvalidParameter, match="dim 8"):
        StatsAccumulator(D, raw=True).merge(StatsAccumulator(8, raw=True))
    with pytest.raises(InvalidParameter, match="raw=False"):
        StatsAccumulator(D, raw=True).merge(StatsAccumulator(D, raw=False))


@pytest.mark.parametrize("n, cov_sample", [(5000, 700), (5000, 0), (300, 1000)])
def test_covariance_rows_of_a_part_are_the_ones_the_stream_gives(n, cov_sample):
    pick = stats_mod.cov_row_picker(n, cov_sample, seed=4)
    start = 0
    for rows in (1, 999, 2, 1700, 2298)[: 5 if n == 5000 else 1]:
        expected = pick(rows)
        got = stats_mod.cov_rows_at(n, cov_sample, 4, start, rows)
        if expected is None:
            assert got is None
        else:
            np.testing.assert_array_equal(got, expected)
        start += rows

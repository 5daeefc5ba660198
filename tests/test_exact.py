"""Exact KL / KLR (SPEC 2) against an independent float64 numpy implementation."""

import contextlib
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from indexer.errors import InvalidParameter
from queries.exact import exact_kl, sample_ids, sampled_softmax_kl


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference(q, c, a, b=None):
    """SPEC 2 on the full (q, N) score matrix, float64."""
    s = a * (np.asarray(q, np.float64) @ np.asarray(c, np.float64).T)
    n = s.shape[1]
    lse = logsumexp(s, axis=1)
    p = np.exp(s - lse[:, None])
    e_s = (p * s).sum(axis=1)
    if b is None:
        return e_s - lse + math.log(n), lse - math.log(n) - s.mean(axis=1)
    return e_s + math.log(n - 1) + b, -math.log(n - 1) - b - s.mean(axis=1)


@pytest.fixture
def data():
    r = np.random.default_rng(1)
    return unit(r.standard_normal((37, 24))), unit(r.standard_normal((1001, 24)))


@pytest.mark.parametrize("b", [None, -10.0])
@pytest.mark.parametrize("chunks", [(7, 101), (37, 1001), (1000, 64), (1, 333)])
def test_exact_matches_numpy(data, b, chunks):
    q, c = data
    kl, klr = exact_kl(q, c, 100.0, b, chunk_q=chunks[0], chunk_n=chunks[1])
    ref_kl, ref_klr = reference(q, c, 100.0, b)
    np.testing.assert_allclose(kl, ref_kl, rtol=1e-10)
    np.testing.assert_allclose(klr, ref_klr, rtol=1e-10)
    assert kl.dtype == np.float64 and klr.shape == (37,)


def test_clip_scores_are_nonnegative_and_finite_at_large_scale(data):
    q, c = data
    kl, klr = exact_kl(q, c, 5000.0, chunk_q=5, chunk_n=128)  # e^5000 would overflow without the shift
    assert np.isfinite(kl).all() and np.isfinite(klr).all()
    assert (kl >= -1e-9).all() and (klr >= -1e-9).all()


def test_float16_memmap_candidates(tmp_path, data):
    q, c = data
    np.save(tmp_path / "c.npy", c.astype(np.float16))
    mm = np.load(tmp_path / "c.npy", mmap_mode="r")
    kl, klr = exact_kl(q.astype(np.float32), mm, 100.0, chunk_q=10, chunk_n=300)
    ref_kl, ref_klr = reference(q.astype(np.float32), mm, 100.0)
    np.testing.assert_allclose(kl, ref_kl, rtol=1e-10)
    np.testing.assert_allclose(klr, ref_klr, rtol=1e-10)


def test_float32_option_is_close(data):
    q, c = data
    kl, klr = exact_kl(q, c, 100.0, chunk_q=9, chunk_n=200, dtype=torch.float32)
    ref_kl, ref_klr = reference(q, c, 100.0)
    np.testing.assert_allclose(kl, ref_kl, atol=1e-3)
    np.testing.assert_allclose(klr, ref_klr, atol=1e-3)


def test_progress_and_empty_queries(data):
    q, c = data
    seen = []

    @contextlib.contextmanager
    def progress(label, total):
        seen.append(total)
        yield lambda k: seen.append(k)

    exact_kl(q, c, 100.0, chunk_n=500, progress=progress)
    assert seen == [1001, 500, 500, 1]
    kl, klr = exact_kl(q[:0], c, 100.0)
    assert kl.shape == klr.shape == (0,)


@pytest.mark.parametrize("a", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale(data, a):
    q, c = data
    with pytest.raises(InvalidParameter, match="logit scale"):
        exact_kl(q, c, a)


def test_sampled_softmax_is_exact_over_the_sample(data):
    q, c = data
    ids = sample_ids(len(c), 100, seed=3)
    assert len(np.unique(ids)) == 100 and (np.diff(ids) > 0).all()
    for b in (None, -5.0):
        kl, klr = sampled_softmax_kl(q, c, 100.0, 100, seed=3, b=b)
        ref_kl, ref_klr = reference(q, c[ids], 100.0, b)  # log M in place of log N
        np.testing.assert_allclose(kl, ref_kl, rtol=1e-10)
        np.testing.assert_allclose(klr, ref_klr, rtol=1e-10)
    with pytest.raises(InvalidParameter, match="1002"):
        sampled_softmax_kl(q, c, 100.0, 1002)

"""Exact KL / KLR (SPEC 2) against an independent float64 numpy implementation."""

import contextlib
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.queries.exact import Moments, exact_kl, exact_kl_both, exact_moments, sample_ids, sampled_softmax_kl


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

    exact_kl(q, c, 100.0, chunk_q=10, chunk_n=500, progress=progress)
    assert seen == [37, 10, 10, 10, 7]  # queries done
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


@pytest.mark.parametrize("b", [None, -10.0])
@pytest.mark.parametrize("chunks", [(7, 101), (64, 2000), (1, 333)])
def test_both_sides_from_one_pass_match_numpy(b, chunks):
    r = np.random.default_rng(4)
    texts, images = unit(r.standard_normal((300, 16))), unit(r.standard_normal((300, 16)))
    out = exact_kl_both(texts, images, 50.0, b, precision="float64", chunk_q=chunks[0], chunk_n=chunks[1])
    for side, q, c in (("text", texts, images), ("image", images, texts)):
        ref_kl, ref_klr = reference(q, c, 50.0, b)
        np.testing.assert_allclose(out[side][0], ref_kl, rtol=1e-10)
        np.testing.assert_allclose(out[side][1], ref_klr, rtol=1e-10)


def test_columns_far_below_the_block_maximum_keep_their_mass():
    # a = 5000: one text matches one image perfectly (s = 5000) while other columns of the same
    # block score thousands lower; float32 e^(s - blockmax) underflows there, so those columns
    # must be recomputed with their own maximum.
    r = np.random.default_rng(5)
    images = unit(r.standard_normal((200, 8)))
    texts = unit(r.standard_normal((200, 8)))
    texts[0] = images[0]
    for precision, rtol in (("float64", 1e-9), ("float32", 1e-4)):
        out = exact_kl_both(texts, images, 5000.0, precision=precision, chunk_q=64, chunk_n=64)
        ref_kl, ref_klr = reference(images, texts, 5000.0)
        assert np.isfinite(out["image"][0]).all()
        np.testing.assert_allclose(out["image"][1], ref_klr, rtol=rtol)
        np.testing.assert_allclose(out["image"][0], ref_kl, rtol=rtol, atol=1e-3)


def test_column_partials_of_query_chunks_merge_to_the_whole():
    r = np.random.default_rng(6)
    q, c = unit(r.standard_normal((90, 12))), unit(r.standard_normal((70, 12)))
    _, whole = exact_moments(q, c, 80.0, rows=False, cols=True, precision="float64")
    merged = Moments(70)
    for s in (slice(0, 13), slice(13, 60), slice(60, 90)):
        merged.merge_all(exact_moments(q[s], c, 80.0, rows=False, cols=True, precision="float64")[1])
    mean = np.zeros(70)
    np.testing.assert_allclose(merged.kl(mean, 90), whole.kl(mean, 90), rtol=1e-12)


def test_float32_fused_pass_error_is_small():
    r = np.random.default_rng(7)
    texts, images = unit(r.standard_normal((400, 32))), unit(r.standard_normal((400, 32)))
    texts = unit(texts + 0.8 * images)  # CLIP-like: matched pairs closer
    out = exact_kl_both(texts, images, 100.0, precision="float32", chunk_q=128, chunk_n=256)
    for side, q, c in (("text", texts, images), ("image", images, texts)):
        ref_kl, ref_klr = reference(q, c, 100.0)
        assert np.abs(out[side][0] - ref_kl).max() < 1e-4
        assert np.abs(out[side][1] - ref_klr).max() < 1e-4


def test_unknown_precision():
    with pytest.raises(InvalidParameter, match="precision"):
        exact_kl_both(np.eye(3), np.eye(3), 10.0, precision="int8")


def test_staged_candidates_give_the_same_partials(tmp_path):
    from clip_density_index.queries.exact import stage

    r = np.random.default_rng(8)
    q, c = unit(r.standard_normal((50, 16))), unit(r.standard_normal((300, 16)))
    np.save(tmp_path / "c.npy", c.astype(np.float16))
    mm = np.load(tmp_path / "c.npy", mmap_mode="r")
    staged = stage(mm, "cpu", "float32", block=64)
    assert staged.shape == (300, 16) and staged.dtype == torch.float32
    a = exact_moments(q, mm, 60.0, rows=True, cols=True, precision="float32", device="cpu")
    b = exact_moments(q, staged, 60.0, rows=True, cols=True, precision="float32", device="cpu")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.s0, y.s0)
        np.testing.assert_array_equal(x.max, y.max)

"""Tests of queries/closed_form.py (SPEC 4-7).

Every pure function is checked against an independent, deliberately naive numpy implementation
(row loops, the O(n^2) conformity definition, scipy's Gaussian log-density). The pool drivers
(``closed_form_scores``, ``clipscore_scores``) are tested on ``FakePool``, a tiny stand-in that
exposes only the ``PoolIndex`` attributes the drivers read (``n``, ``logit_scale``, ``embeddings()``,
``raw_norms()``, ``stat()``); it is NOT a real index. Its statistics are computed here with numpy.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from scipy import stats as sps

from clip_density_index.indexer.errors import BadInput, InvalidParameter
from clip_density_index.queries import closed_form as cf

A = 100.0


def clip_like(n: int, d: int, seed: int, offset: float = 2.0) -> np.ndarray:
    """Raw vectors on a shifted, anisotropic cloud (a CLIP-like cone after normalisation)."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=d)
    centre *= offset / np.linalg.norm(centre)
    scales = np.linspace(0.3, 1.5, d)
    return centre + rng.normal(size=(n, d)) * scales / np.sqrt(d) * 3


def unit(u: np.ndarray) -> np.ndarray:
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def inv_sqrt(S: np.ndarray) -> np.ndarray:
    w, V = np.linalg.eigh(S)
    return (V / np.sqrt(w)) @ V.T


# -- naive references -----------------------------------------------------------------------------


def ref_dc(v, vbar, a):
    return np.array([a * a * float(np.dot(x - vbar, x - vbar)) for x in v])


def ref_dw(v, vbar, G, a):
    return np.array([a * a * float((x - vbar) @ G @ (x - vbar)) for x in v])


def ref_conformity(v):
    """mean_{k != j} cos(v_j, v_k): the O(n^2) definition (full cosine matrix, diagonal dropped)."""
    n = len(v)
    x = v / np.linalg.norm(v, axis=1, keepdims=True)
    cos = x @ x.T
    off = ~np.eye(n, dtype=bool)
    return np.array([cos[j][off[j]].mean() for j in range(n)])


def ref_cos(x, y):
    return np.array([np.dot(p, q) / (np.linalg.norm(p) * np.linalg.norm(q)) for p, q in zip(x, y)])


# -- pure functions -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    u_img = clip_like(800, 32, seed=1)
    u_txt = clip_like(800, 32, seed=2)
    return u_img, u_txt, unit(u_img), unit(u_txt)


def test_dc_matches_reference(data):
    _, _, v, _ = data
    vbar = v.mean(0)
    np.testing.assert_allclose(cf.dc(v, vbar, A), ref_dc(v, vbar, A), rtol=1e-12)


def test_dw_matches_reference(data):
    _, _, v, w = data
    vbar, G = v.mean(0), np.cov(w, rowvar=False)
    got = cf.dw(v, vbar, G, A)
    assert got.dtype == np.float64 and got.shape == (len(v),)
    np.testing.assert_allclose(got, ref_dw(v, vbar, G, A), rtol=1e-10)


def test_dw_ranking_invariant_to_scale_of_G(data):
    _, _, v, w = data
    vbar = v.mean(0)
    G1 = np.cov(w, rowvar=False, ddof=1)
    G0 = np.cov(w, rowvar=False, ddof=0)
    r1 = np.argsort(cf.dw(v, vbar, G1, A))
    np.testing.assert_array_equal(r1, np.argsort(cf.dw(v, vbar, G0, A)))
    np.testing.assert_array_equal(r1, np.argsort(cf.dw(v, vbar, 37.5 * G1, 3.0)))


def test_rawnorm_matches_reference(data):
    u, *_ = data
    norms = np.linalg.norm(u, axis=1)
    ref = np.array([A * A * float(np.dot(x, x)) for x in u])
    np.testing.assert_allclose(cf.rawnorm(norms, A), ref, rtol=1e-12)
    assert np.isnan(cf.rawnorm(np.array([np.nan, 1.0]), A)[0])


def test_conformity_exact_matches_quadratic_definition(data):
    _, _, v, _ = data
    got = cf.conformity(v, v.sum(0), len(v))
    np.testing.assert_allclose(got, ref_conformity(v), rtol=1e-10, atol=1e-13)


def test_conformity_of_a_chunk_uses_the_whole_pool_sum(data):
    _, _, v, _ = data
    v = v[:200]
    full = ref_conformity(v)
    got = np.concatenate([cf.conformity(v[s : s + 64], v.sum(0), len(v)) for s in range(0, 200, 64)])
    np.testing.assert_allclose(got, full, rtol=1e-10, atol=1e-13)


def test_conformity_undefined_for_a_single_sample():
    assert np.isnan(cf.conformity(np.ones((1, 1)), np.ones(1), 1)).all()


def test_conformity_est_is_cosine_to_mean(data):
    _, _, v, _ = data
    m = v.mean(0)
    np.testing.assert_allclose(cf.conformity_est(v, m), ref_cos(v, np.broadcast_to(m, v.shape)), rtol=1e-12)
    # the paper's claim: C_hat tracks C almost perfectly
    assert np.corrcoef(cf.conformity_est(v, m), cf.conformity(v, v.sum(0), len(v)))[0, 1] > 0.999


def test_dc_and_conformity_are_perfectly_anticorrelated(data):
    _, _, v, w = data
    for x in (v, w):
        r = np.corrcoef(cf.dc(x, x.mean(0), A), cf.conformity(x, x.sum(0), len(x)))[0, 1]
        assert abs(r + 1.0) < 1e-9


def test_loglik_equals_gaussian_logpdf(data):
    u, *_ = data
    mu = u.mean(0)
    S = np.cov(u, rowvar=False)
    W = inv_sqrt(S)
    logdet = -0.5 * np.linalg.slogdet(S)[1]
    np.testing.assert_allclose(cf.loglik(u, mu, W, logdet), sps.multivariate_normal(mu, S).logpdf(u), rtol=1e-9)


def test_loglik_non_symmetric_whitener():
    # W need only satisfy W^T W = S^-1; the Cholesky-based whitener is not symmetric.
    u = clip_like(500, 16, seed=3)
    mu, S = u.mean(0), np.cov(u, rowvar=False)
    W = np.linalg.cholesky(np.linalg.inv(S)).T
    logdet = np.log(np.abs(np.linalg.det(W)))
    np.testing.assert_allclose(cf.loglik(u, mu, W, logdet), sps.multivariate_normal(mu, S).logpdf(u), rtol=1e-9)


def test_clipscore_matches_reference_and_clips_negatives(data):
    _, _, v, w = data
    got = cf.clipscore(v, w)
    np.testing.assert_allclose(got, 2.5 * np.maximum(ref_cos(v, w), 0.0), rtol=1e-12)
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    y = np.array([[-1.0, 0.1], [1.0, 1.0], [0.0, 5.0]])
    np.testing.assert_allclose(cf.clipscore(x, y), [0.0, 2.5 / np.sqrt(2), 2.5])
    rng = np.random.default_rng(5)
    p, q = rng.normal(size=(500, 8)), rng.normal(size=(500, 8))
    cos, got = ref_cos(p, q), cf.clipscore(p, q)
    assert (cos < 0).sum() > 100
    assert np.all(got[cos < 0] == 0.0) and np.all(got[cos > 0] > 0.0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_low_precision_inputs_give_float64(data, dtype):
    _, _, v, w = data
    vl, wl = v.astype(dtype), w.astype(dtype)
    v64 = vl.astype(np.float64)
    vbar, G = v.mean(0).astype(dtype), np.cov(w, rowvar=False).astype(dtype)
    for got, ref in [
        (cf.dc(vl, vbar, A), ref_dc(v64, vbar.astype(np.float64), A)),
        (cf.dw(vl, vbar, G, A), ref_dw(v64, vbar.astype(np.float64), G.astype(np.float64), A)),
        (cf.clipscore(vl, wl), 2.5 * np.maximum(ref_cos(v64, wl.astype(np.float64)), 0)),
        (cf.conformity_est(vl, vbar), ref_cos(v64, np.broadcast_to(vbar.astype(np.float64), v.shape))),
    ]:
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


# -- pool drivers on a fake pool ------------------------------------------------------------------


class FakePool:
    """Stand-in for ``indexer.pool.PoolIndex``: only n, logit_scale, embeddings(), raw_norms(), stat().

    Statistics follow the catalog conventions (indexer/stats.py): mean/sum/cov of the normalised
    vectors (ddof=1); whitening stats on the raw vectors when ``raw_known`` else on the normalised.
    """

    def __init__(self, u_img, u_txt, *, raw_known=True, dtype=np.float32, logit_scale=A, ridge=1e-6):
        self.n = len(u_img)
        self.logit_scale = logit_scale
        self._raw = {"image": u_img, "text": u_txt}
        self._emb = {m: unit(u).astype(dtype) for m, u in self._raw.items()}
        self._norms = {m: np.linalg.norm(u, axis=1) for m, u in self._raw.items()} if raw_known else None
        self._stats = {}
        for m, u in self._raw.items():
            v = unit(u)
            x = u if raw_known else v
            S = np.cov(x, rowvar=False) + ridge * np.eye(x.shape[1])
            self._stats[m] = {
                "mean": v.mean(0),
                "sum": v.sum(0),
                "cov": np.cov(v, rowvar=False),
                "whiten_mean": x.mean(0),
                "whiten": inv_sqrt(S),
                "whiten_logdet": np.asarray(-0.5 * np.linalg.slogdet(S)[1]),
                "_S": S,
            }

    def embeddings(self, modality):
        return self._emb[modality]

    def raw_norms(self, modality):
        return None if self._norms is None else self._norms[modality]

    def stat(self, modality, name):
        return self._stats[modality][name]


@pytest.fixture(scope="module")
def pools():
    u_img, u_txt = clip_like(600, 24, seed=10), clip_like(600, 24, seed=11)
    return {
        "raw": FakePool(u_img, u_txt, raw_known=True, dtype=np.float32),
        "noraw": FakePool(u_img, u_txt, raw_known=False, dtype=np.float16),
    }


@pytest.mark.parametrize("kind", ["raw", "noraw"])
@pytest.mark.parametrize("modality", ["image", "text"])
def test_closed_form_scores_match_numpy(pools, kind, modality):
    pool = pools[kind]
    other = "text" if modality == "image" else "image"
    got = cf.closed_form_scores(pool, modality, chunk=97)
    assert set(got) == {f"{m}_{modality}" for m in cf.METRICS}
    for col in got.values():
        assert col.dtype == np.float64 and col.shape == (pool.n,)

    v = pool.embeddings(modality).astype(np.float64)  # what is stored, upcast
    st = pool._stats[modality]
    np.testing.assert_allclose(got[f"dc_{modality}"], ref_dc(v, st["mean"], A), rtol=1e-10)
    np.testing.assert_allclose(
        got[f"dw_{modality}"], ref_dw(v, st["mean"], np.cov(unit(pool._raw[other]), rowvar=False), A), rtol=1e-10
    )
    np.testing.assert_allclose(
        got[f"conformity_est_{modality}"], ref_cos(v, np.broadcast_to(st["mean"], v.shape)), rtol=1e-10
    )
    # exact conformity against the O(n^2) definition on the stored vectors; float16 storage
    # leaves |v| = 1 only to ~1e-3, so the tolerance depends on the storage dtype
    tol = 1e-6 if kind == "raw" else 2e-3
    np.testing.assert_allclose(got[f"conformity_{modality}"], ref_conformity(unit(v)), atol=tol)

    S, mu = st["_S"], st["whiten_mean"]
    if kind == "raw":
        norms = np.linalg.norm(pool._raw[modality], axis=1)
        np.testing.assert_allclose(got[f"rawnorm_{modality}"], A * A * norms**2, rtol=1e-12)
        x = v * norms[:, None]  # raw vector = rawnorm * stored normalised vector
    else:
        assert np.isnan(got[f"rawnorm_{modality}"]).all()
        x = v
    np.testing.assert_allclose(got[f"loglik_{modality}"], sps.multivariate_normal(mu, S).logpdf(x), rtol=1e-9)


def test_float32_products_are_close_to_float64(pools):
    """``precision="float32"`` (what ``score`` uses): dw and loglik within 1e-5 relative; the rest
    unchanged."""
    pool = pools["raw"]
    exact = cf.closed_form_scores(pool, "image")
    fast = cf.closed_form_scores(pool, "image", precision="float32")
    for k in exact:
        tol = 1e-5 if k.startswith(("dw_", "loglik_")) else 1e-12
        np.testing.assert_allclose(fast[k], exact[k], rtol=tol, atol=1e-9, err_msg=k)
    assert not np.array_equal(fast["dw_image"], exact["dw_image"])  # really another computation
    with pytest.raises(InvalidParameter, match="precision"):
        cf.closed_form_scores(pool, "image", precision="half")


def test_closed_form_scores_chunking_invariant(pools):
    pool = pools["raw"]
    whole = cf.closed_form_scores(pool, "text", chunk=10**6)
    for chunk in (1, 7, 599, 600):
        parts = cf.closed_form_scores(pool, "text", chunk=chunk)
        for k in whole:
            np.testing.assert_allclose(parts[k], whole[k], rtol=1e-12, atol=1e-12, err_msg=f"{k} chunk={chunk}")


def test_closed_form_scores_metrics_subset_and_scale(pools):
    pool = pools["raw"]
    got = cf.closed_form_scores(pool, "image", metrics={"dc", "rawnorm"})
    assert set(got) == {"dc_image", "rawnorm_image"}
    half = cf.closed_form_scores(pool, "image", metrics={"dc", "dw", "rawnorm"}, a=50.0)
    np.testing.assert_allclose(half["dc_image"], got["dc_image"] / 4, rtol=1e-12)
    np.testing.assert_allclose(half["rawnorm_image"], got["rawnorm_image"] / 4, rtol=1e-12)
    assert cf.closed_form_scores(pool, "image", metrics=set()) == {}


def test_closed_form_scores_reads_only_needed_stats(pools):
    class Strict(FakePool):
        def __init__(self, base, allowed):
            self.__dict__.update(base.__dict__)
            self.allowed = allowed

        def stat(self, modality, name):
            assert (modality, name) in self.allowed, (modality, name)
            return super().stat(modality, name)

    pool = Strict(pools["raw"], {("text", "sum")})
    assert set(cf.closed_form_scores(pool, "text", metrics={"conformity"})) == {"conformity_text"}
    pool = Strict(pools["raw"], {("image", "mean"), ("text", "cov")})
    assert set(cf.closed_form_scores(pool, "image", metrics={"dw"})) == {"dw_image"}


def test_closed_form_scores_errors(pools):
    pool = pools["raw"]
    with pytest.raises(InvalidParameter, match="bogus"):
        cf.closed_form_scores(pool, "image", metrics={"dc", "bogus"})
    with pytest.raises(InvalidParameter, match="chunk"):
        cf.closed_form_scores(pool, "image", chunk=0)
    with pytest.raises(ValueError, match="modality"):
        cf.closed_form_scores(pool, "audio")

    class BadStat(FakePool):
        def __init__(self, base):
            self.__dict__.update(base.__dict__)

        def stat(self, modality, name):
            return np.zeros(3) if name == "mean" else super().stat(modality, name)

    with pytest.raises(BadInput, match="'mean'.*shape"):
        cf.closed_form_scores(BadStat(pool), "image", metrics={"dc"})


def test_progress_hook_sees_every_row(pools):
    seen = []

    @contextlib.contextmanager
    def progress(label, total):
        seen.append((label, total))
        yield lambda k: seen.append(k)

    cf.closed_form_scores(pools["raw"], "image", chunk=250, progress=progress)
    assert seen[0] == ("closed-form image", 600) and sum(seen[1:]) == 600


def test_a_column_hook_gets_the_same_values_written_into_its_arrays(pools, tmp_path):
    """``column=`` (``score``'s column files): every column is written into the array the hook
    made (here memory maps of .npy files), equal bit for bit to the in-memory result."""
    from clip_density_index.queries.columns import Columns

    for kind, pool in pools.items():
        want = cf.closed_form_scores(pool, "text", chunk=97)
        with Columns(tmp_path / kind, pool.n) as cols:
            got = cf.closed_form_scores(pool, "text", chunk=97, column=cols.new)
            score = cf.clipscore_scores(pool, chunk=97, column=cols.new)
            assert sorted(cols) == sorted([*want, "clipscore"])
            assert all(got[c] is cols[c] for c in want) and score is cols["clipscore"]
            for c in want:  # NaN where the raw norms are unknown, in both
                np.testing.assert_array_equal(np.load(tmp_path / kind / f"{c}.npy"), want[c], err_msg=f"{kind} {c}")
            np.testing.assert_array_equal(cols["clipscore"], cf.clipscore_scores(pool, chunk=97))


def test_clipscore_scores(pools):
    for pool in pools.values():
        got = cf.clipscore_scores(pool, chunk=64)
        vi = pool.embeddings("image").astype(np.float64)
        vt = pool.embeddings("text").astype(np.float64)
        assert got.dtype == np.float64 and got.shape == (pool.n,)
        np.testing.assert_allclose(got, 2.5 * np.maximum(ref_cos(vi, vt), 0), rtol=1e-10)


# -- a real index ---------------------------------------------------------------------------------


def test_closed_form_scores_on_a_built_synthetic_index(tmp_path):
    """Build a real index (SyntheticSource, raw known) and recompute every column with numpy from
    the source's raw arrays: normalisation, statistics, whitening and scores all independent of
    indexer.stats and of this module."""
    from clip_density_index.indexer.build import build_index
    from clip_density_index.indexer.pool import open_index
    from clip_density_index.indexer.synthetic import SyntheticSource

    src = SyntheticSource(n=2000, dim=64)
    raw = {"image": [], "text": []}
    for b in src.batches(512):
        raw["image"].append(b.image)
        raw["text"].append(b.text)
    raw = {m: np.concatenate(x).astype(np.float64) for m, x in raw.items()}
    # nprobe plays no part in closed-form scores; explicit so the test does not hinge on FAISS defaults
    build_index(SyntheticSource(n=2000, dim=64), tmp_path / "idx", batch_size=300, nprobe=1)
    pool = open_index(tmp_path / "idx")
    a = pool.logit_scale
    assert pool.n == 2000 and pool.raw_known

    # embeddings and raw norms are stored in float32: agreement to ~2e-7 relative is expected
    v = {m: unit(u) for m, u in raw.items()}
    for m, other in (("image", "text"), ("text", "image")):
        got = cf.closed_form_scores(pool, m, chunk=333)
        x, u = v[m], raw[m]
        vbar = x.mean(0)
        np.testing.assert_allclose(got[f"dc_{m}"], a * a * ((x - vbar) ** 2).sum(1), rtol=1e-5)
        G = np.cov(v[other], rowvar=False, ddof=1)
        np.testing.assert_allclose(got[f"dw_{m}"], ref_dw(x, vbar, G, a), rtol=1e-5)
        np.testing.assert_allclose(got[f"rawnorm_{m}"], a * a * (u**2).sum(1), rtol=1e-5)
        np.testing.assert_allclose(got[f"conformity_{m}"], ref_conformity(x), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(
            got[f"conformity_est_{m}"], ref_cos(x, np.broadcast_to(vbar, x.shape)), rtol=1e-5, atol=1e-7
        )
        # whitening on the raw vectors, with the documented relative ridge (1e-6 * mean eigenvalue)
        S = np.cov(u, rowvar=False)
        S = S + 1e-6 * np.trace(S) / S.shape[0] * np.eye(S.shape[0])
        ref = sps.multivariate_normal(u.mean(0), S).logpdf(u)
        np.testing.assert_allclose(got[f"loglik_{m}"], ref, rtol=1e-6)
        assert abs(np.corrcoef(got[f"dc_{m}"], got[f"conformity_{m}"])[0, 1] + 1) < 1e-6

    np.testing.assert_allclose(
        cf.clipscore_scores(pool, chunk=333), 2.5 * np.maximum(ref_cos(v["image"], v["text"]), 0), rtol=1e-5, atol=1e-7
    )

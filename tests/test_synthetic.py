"""The built-in SYNTHETIC CLIP-like world: calibration measured on generated data, determinism,
metadata, the prompt encoder, geometry variants and the spread of KL scores."""

import json
import re
import time

import numpy as np
import pyarrow as pa
import pytest

from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.indexer.source import Batch
from clip_density_index.indexer.synthetic import BLOCK_SIZE, SCENE, ATTRIBUTE, SyntheticSource, SyntheticWorld

N = 4500  # more than one generator block (BLOCK_SIZE = 4096)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def mean_offdiag_cos(a: np.ndarray, b: np.ndarray | None = None) -> float:
    """Mean cosine over all pairs i != j of unit rows (exact, O(n d))."""
    n = len(a)
    if b is None:
        s = a.sum(0)
        return float((s @ s - n) / (n * (n - 1)))
    return float((a.sum(0) @ b.sum(0) - np.einsum("ij,ij->", a, b)) / (n * (n - 1)))


def text_side_kl(text: np.ndarray, image: np.ndarray, a: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    """Exact text-side D_KL (SPEC 2) of every caption over all images, and p(own image | caption)."""
    s = a * (unit(text) @ unit(image).T)
    lse = np.logaddexp.reduce(s, axis=1)
    p = np.exp(s - lse[:, None])
    kl = (p * s).sum(1) - lse + np.log(len(image))
    return kl, np.diag(p)


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(seed=0)


@pytest.fixture(scope="module")
def data(world):
    meta, image, text = world.sample(0, N)
    return meta, image, text, unit(image), unit(text)


# ---------------------------------------------------------------------------------------------
# Calibration (CLIP ViT-B/32-like numbers), measured on generated data.
# ---------------------------------------------------------------------------------------------
def test_matched_cosine_is_clip_like_and_above_random_pairs(data):
    _, _, _, vi, vt = data
    matched = np.einsum("ij,ij->i", vi, vt)
    random_pairs = mean_offdiag_cos(vi, vt)
    assert 0.25 <= matched.mean() <= 0.35, matched.mean()
    assert matched.mean() - random_pairs >= 0.1, (matched.mean(), random_pairs)
    # a per-sample property, not only on average: most pairs beat a random caption
    shuffled = np.einsum("ij,ij->i", vi, np.roll(vt, 1, axis=0))
    assert (matched > shuffled).mean() > 0.85


def test_narrow_cone_in_each_modality(data):
    _, _, _, vi, vt = data
    for name, v in (("image", vi), ("text", vt)):
        c = mean_offdiag_cos(v)
        assert 0.3 <= c <= 0.7, (name, c)


def test_modality_gap_clouds_are_linearly_separable(data):
    _, _, _, vi, vt = data
    half = N // 2  # fit the direction on one half, measure on the other
    d = vi[:half].mean(0) - vt[:half].mean(0)
    thr = 0.5 * (vi[:half] @ d).mean() + 0.5 * (vt[:half] @ d).mean()
    acc = 0.5 * ((vi[half:] @ d > thr).mean() + (vt[half:] @ d < thr).mean())
    assert acc >= 0.995, acc
    # least-squares linear classifier (with bias) agrees
    x = np.hstack([np.vstack([vi, vt]), np.ones((2 * N, 1))])
    y = np.r_[np.ones(N), -np.ones(N)]
    xtr = x[::2]
    w = np.linalg.solve(xtr.T @ xtr + 1e-6 * np.eye(x.shape[1]), xtr.T @ y[::2])
    assert (np.sign(x[1::2] @ w) == y[1::2]).mean() >= 0.995


def test_raw_clouds_are_off_origin_double_ellipsoid_with_varying_norms(data):
    _, image, text, _, _ = data
    for name, u in (("image", image), ("text", text)):
        u = u.astype(np.float64)
        ratio = np.linalg.norm(u.mean(0)) / np.sqrt(u.var(0, ddof=1).sum())  # sqrt(trace(cov))
        assert 0.7 <= ratio <= 1.4, (name, ratio)
        norms = np.linalg.norm(u, axis=1)
        assert 5 <= norms.mean() <= 20, (name, norms.mean())
        assert norms.std() / norms.mean() > 0.06, (name, norms.std())  # per-sample scale
        # anisotropic: the covariance is an ellipsoid, not a sphere
        ev = np.linalg.eigvalsh(np.cov(u[:1500], rowvar=False))
        assert ev[-1] / np.median(ev) > 5, name


# ---------------------------------------------------------------------------------------------
# KL scores are meaningful: rare concepts give peaked conditionals.
# ---------------------------------------------------------------------------------------------
def test_text_side_kl_is_spread_and_higher_for_rare_concepts(world, data):
    meta, _, _, vi, vt = data
    n = 2000
    kl, p_own = text_side_kl(vt[:n], vi[:n])
    assert np.all(np.isfinite(kl)) and kl.min() >= -1e-9 and kl.max() <= np.log(n) + 1e-9
    assert kl.std() > 0.5, kl.std()
    # the softmax over 100*cos is neither degenerate (own image ~ 1) nor uniform (own ~ 1/n)
    assert 20.0 / n < np.median(p_own) < 0.6, np.median(p_own)
    rank = np.empty(len(world.concepts), dtype=int)
    rank[np.argsort(-world.frequencies)] = np.arange(len(world.concepts))
    rarest = np.array([max(rank[world.concept_index[c]] for c in cs)
                       for cs in meta.column("concepts").to_pylist()[:n]])
    common, rare = rarest < 10, rarest >= 100
    assert common.sum() >= 50 and rare.sum() >= 50
    assert kl[rare].mean() > kl[common].mean() + 0.3, (kl[rare].mean(), kl[common].mean())


# ---------------------------------------------------------------------------------------------
# Determinism.
# ---------------------------------------------------------------------------------------------
def test_same_seed_same_world_different_seed_different_world(data):
    meta, image, text, _, _ = data
    m2, i2, t2 = SyntheticWorld(seed=0).sample(0, 1000)
    assert m2.equals(meta.slice(0, 1000))
    np.testing.assert_array_equal(i2, image[:1000])
    np.testing.assert_array_equal(t2, text[:1000])
    m3, i3, _ = SyntheticWorld(seed=1).sample(0, 1000)
    assert not np.allclose(i3, image[:1000])
    assert m3.column("uid").to_pylist() != m2.column("uid").to_pylist()


def test_rows_do_not_depend_on_batch_size_or_range_split(data):
    meta, image, text, _, _ = data
    src = SyntheticSource(n=N, seed=0)
    for bs in (333, BLOCK_SIZE):
        batches = list(src.batches(bs))
        assert all(isinstance(b, Batch) and b.origin == "synthetic" for b in batches)
        assert [b.row_offset for b in batches] == list(range(0, N, bs))
        assert sum(len(b.meta) for b in batches) == N
        np.testing.assert_array_equal(np.concatenate([b.image for b in batches]), image)
        np.testing.assert_array_equal(np.concatenate([b.text for b in batches]), text)
        assert pa.concat_tables([b.meta for b in batches]).equals(meta)
    # a range straddling a block boundary, from a fresh world (no cache)
    m, i, t = SyntheticWorld(seed=0).sample(BLOCK_SIZE - 7, 20)
    assert len(m) == 20 and i.shape == (20, 512)
    assert m.equals(meta.slice(BLOCK_SIZE - 7, 20))
    np.testing.assert_array_equal(i, image[BLOCK_SIZE - 7:BLOCK_SIZE + 13])


def test_far_rows_are_generated_without_the_rows_before_them():
    """Row 999,990 of a 1M pool costs one block, not the million rows before it (chunked 1M)."""
    t0 = time.perf_counter()
    meta, image, text = SyntheticWorld(seed=0, dim=64).sample(999_990, 10)
    assert time.perf_counter() - t0 < 2.0
    assert image.shape == text.shape == (10, 64) and len(meta) == 10
    m2, i2, t2 = SyntheticWorld(seed=0, dim=64).sample(999_995, 5)
    assert m2.equals(meta.slice(5))
    np.testing.assert_array_equal(i2, image[5:])
    np.testing.assert_array_equal(t2, text[5:])


# ---------------------------------------------------------------------------------------------
# Metadata: uids, captions, concepts, vocabulary.
# ---------------------------------------------------------------------------------------------
def test_metadata_columns_uids_and_dtypes(data):
    meta, image, text, _, _ = data
    assert meta.schema.field("uid").type == pa.string()
    assert meta.schema.field("caption").type == pa.string()
    assert meta.schema.field("concepts").type == pa.list_(pa.string())
    assert meta.schema.field("synthetic").type == pa.bool_()
    uids = meta.column("uid").to_pylist()
    assert len(set(uids)) == N
    assert all(re.fullmatch(r"[0-9a-f]{32}", u) for u in uids)
    assert all(meta.column("synthetic").to_pylist())
    assert image.dtype == text.dtype == np.float32 and image.shape == text.shape == (N, 512)
    assert np.all(np.isfinite(image)) and np.all(np.isfinite(text))


def test_concepts_are_recorded_and_named_in_the_caption(world, data):
    meta = data[0]
    kinds = dict(zip(world.concepts, world.kinds))
    for caption, concepts in zip(meta.column("caption").to_pylist(), meta.column("concepts").to_pylist()):
        assert 1 <= len(concepts) <= 3 and len(set(concepts)) == len(concepts)
        assert world.concepts_in(caption) == concepts, (caption, concepts)
        assert sum(kinds[c] == SCENE for c in concepts) <= 1
        assert sum(kinds[c] == ATTRIBUTE for c in concepts) <= 1
    lengths = [len(c) for c in meta.column("concepts").to_pylist()]
    assert {1, 2, 3} <= set(lengths)


def test_vocabulary_is_zipf_like_and_captions_vary(world, data):
    meta = data[0]
    V = len(world.concepts)
    assert 250 <= V <= 400 and len(set(world.concepts)) == V
    assert all(re.fullmatch(r"[a-z]+", c) for c in world.concepts)
    f = world.frequencies
    assert f.shape == (V,) and np.all(f > 0) and abs(f.sum() - 1) < 1e-12
    sorted_f = np.sort(f)[::-1]
    slope = np.polyfit(np.log(np.arange(1, V + 1)), np.log(sorted_f), 1)[0]
    assert -1.5 < slope < -0.6, slope
    # the draws follow the frequencies (rank correlation of counts with frequencies)
    counts = np.zeros(V)
    for cs in meta.column("concepts").to_pylist():
        for c in cs:
            counts[world.concept_index[c]] += 1
    from scipy.stats import spearmanr

    assert spearmanr(counts, f).correlation > 0.8
    captions = meta.column("caption").to_pylist()
    assert len(set(captions)) > 0.5 * N
    bigrams = {tuple(c.lower().split()[i:i + 2]) for c in captions for i in range(len(c.split()) - 1)}
    assert len(bigrams) > 1000
    assert any(" and " in c for c in captions) and any(re.search(r"\b(in|on|at|by) (a|an|the) ", c)
                                                      for c in captions)


# ---------------------------------------------------------------------------------------------
# Prompt encoder.
# ---------------------------------------------------------------------------------------------
def test_prompt_dog_is_closest_to_dog_images(world, data):
    meta, _, _, vi, _ = data
    q = world.encode_prompt("a photo of a dog")
    assert q.shape == (512,) and q.dtype == np.float32
    np.testing.assert_array_equal(q, world.encode_prompt("a photo of a dog"))
    has = np.array(["dog" in cs for cs in meta.column("concepts").to_pylist()])
    assert has.sum() >= 10
    s = vi @ unit(q)
    assert s[has].mean() > s[~has].mean() + 0.05
    top = np.argsort(-s)[:10]
    assert has[top].mean() >= 0.8


def test_every_frequent_concept_prompt_prefers_its_images(world, data):
    meta, _, _, vi, _ = data
    has = np.zeros((N, len(world.concepts)), dtype=bool)  # sample x concept incidence
    for i, cs in enumerate(meta.column("concepts").to_pylist()):
        has[i, [world.concept_index[c] for c in cs]] = True
    frequent = np.flatnonzero(has.sum(0) >= 5)
    assert len(frequent) >= 100
    prompts = np.stack([world.encode_prompt(f"a photo of a {world.concepts[j]}") for j in frequent])
    s = vi @ unit(prompts).T  # (N, len(frequent))
    h = has[:, frequent]
    mean_with = (s * h).sum(0) / h.sum(0)
    mean_without = (s * ~h).sum(0) / (~h).sum(0)
    worse = [world.concepts[j] for j, ok in zip(frequent, mean_with > mean_without) if not ok]
    assert not worse, worse


def test_category_prompt_prefers_its_category(world, data):
    meta, _, _, vi, _ = data
    cat = dict(zip(world.concepts, world.categories))
    food = np.array([any(cat[c] == "food" for c in cs) for cs in meta.column("concepts").to_pylist()])
    s = vi @ unit(world.encode_prompt("a photo of food"))
    assert s[food].mean() > s[~food].mean() + 0.03


def test_concepts_in_handles_plurals_and_case(world):
    assert world.concepts_in("Two DOGS and three knives near the buses") == ["dog", "knife", "bus"]
    assert world.concepts_in("people with strawberries, a red car") == ["person", "strawberry", "red", "car"]
    assert world.concepts_in("children feeding the geese") == ["child", "goose"]
    assert world.concepts_in("a dog, another dog") == ["dog"]
    assert world.concepts_in("quantum chromodynamics") == []


def test_prompt_without_known_concept_is_a_clear_error(world):
    with pytest.raises(InvalidParameter) as e:
        world.encode_prompt("quantum chromodynamics")
    msg = str(e.value)
    assert "quantum chromodynamics" in msg and "'dog'" in msg


# ---------------------------------------------------------------------------------------------
# Geometry variants.
# ---------------------------------------------------------------------------------------------
def test_geometry_variants_are_valid_and_ordered_by_clustering():
    n = 1000
    spread, kl_mean = {}, {}
    for g in ("flat", "calibrated", "clustered"):
        w = SyntheticWorld(seed=3, geometry=g)
        meta, image, text = w.sample(0, n)
        assert np.all(np.isfinite(image)) and np.all(np.isfinite(text))
        assert np.linalg.norm(image, axis=1).min() > 0 and np.linalg.norm(text, axis=1).min() > 0
        vi, vt = unit(image), unit(text)
        iu = np.triu_indices(n, 1)
        spread[g] = [(v @ v.T)[iu].std() for v in (vi, vt)]  # spread of intra-modality cosines
        kl_mean[g] = text_side_kl(vt, vi)[0].mean()
        assert w.params()["geometry"] == g
    for m in (0, 1):  # image, text
        assert spread["flat"][m] * 1.3 < spread["calibrated"][m] < spread["clustered"][m] / 1.3, spread
    assert kl_mean["flat"] + 0.3 < kl_mean["calibrated"] < kl_mean["clustered"] - 0.3, kl_mean
    # captions and concepts do not depend on the geometry
    a = SyntheticWorld(seed=3, dim=256, geometry="flat").sample(0, 50)[0]
    b = SyntheticWorld(seed=3, dim=64, geometry="clustered").sample(0, 50)[0]
    assert a.equals(b)


# ---------------------------------------------------------------------------------------------
# Source header and parameter checks.
# ---------------------------------------------------------------------------------------------
def test_source_info_is_labelled_synthetic():
    src = SyntheticSource(n=10, seed=5, dim=32, geometry="flat")
    info = src.info
    assert info.source == "synthetic" and info.synthetic and info.raw_known
    assert info.logit_scale == 100.0 and info.model == "synthetic-clip-world"
    assert info.n == 10 and info.dim == 32
    extra = json.loads(json.dumps(info.extra))
    assert extra == src.world.params()
    assert extra["synthetic"] is True and extra["seed"] == 5 and extra["geometry"] == "flat"
    assert "SYNTHETIC" in extra["note"]
    batches = list(src.batches(4))
    assert [len(b.meta) for b in batches] == [4, 4, 2]


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(seed=-1), dict(dim=4), dict(geometry="spiky")])
def test_invalid_parameters_are_rejected(kwargs):
    with pytest.raises(InvalidParameter):
        SyntheticSource(**kwargs)


def test_invalid_ranges_are_rejected(world):
    with pytest.raises(InvalidParameter):
        world.sample(-1, 5)
    with pytest.raises(InvalidParameter):
        list(SyntheticSource(n=5).batches(0))
    meta, image, text = world.sample(10, 0)
    assert len(meta) == 0 and image.shape == (0, 512) and text.shape == (0, 512)


# ---------------------------------------------------------------------------------------------
# Heavy-tailed worlds: each is CLIP-like and heavy-tailed in its own way.
# ---------------------------------------------------------------------------------------------
HEAVY_WORLDS = ("mixture", "duplicates", "templates", "hubs", "heavy")
NH = 3000  # samples per world in these tests


def world_stats(geometry: str, _cache: dict = {}) -> dict:
    """Samples of one world (seed 0) and its exact per-query KL on both sides, and hubness."""
    if geometry not in _cache:
        meta, image, text = SyntheticWorld(seed=0, geometry=geometry).sample(0, NH)
        vi, vt = unit(image), unit(text)
        st = {"meta": meta, "image": image, "text": text, "vi": vi, "vt": vt}
        for side, q, c in (("text", vt, vi), ("image", vi, vt)):
            st[f"kl_{side}"] = text_side_kl(q, c)[0]  # query side q over candidates c (SPEC 2)
            top = np.argpartition(-(q @ c.T), 10, axis=1)[:, :10]
            nk = np.bincount(top.ravel(), minlength=NH)  # k-occurrence: top-10 lists a candidate is in
            st[f"nk_{side}"] = nk
            st[f"hub_share_{side}"] = np.sort(nk)[::-1][: NH // 100].sum() / nk.sum()
        _cache[geometry] = st
    return _cache[geometry]


def test_geometries_defined_once_and_offered_by_the_cli():
    from clip_density_index import cli
    from clip_density_index.indexer.synthetic import GEOMETRIES, TAIL_PRESETS

    assert set(HEAVY_WORLDS) <= set(GEOMETRIES) and set(TAIL_PRESETS) == set(HEAVY_WORLDS)
    option = next(p for p in cli.cli.commands["build-index"].params if p.name == "geometry")
    assert tuple(option.type.choices) == GEOMETRIES


def test_base_worlds_are_unchanged():
    """The heavy-tailed options draw from their own streams: the base worlds keep their rows."""
    expect = {  # first row's image, third row's text (first 3 coordinates), dim 64, seed 0
        "calibrated": ([-1.3170373, 0.19131377, 0.05211169], [-0.68822742, 1.27313912, 0.4301542]),
        "flat": ([-0.72738183, 0.29900986, 0.04826329], [-1.12130153, 1.03671825, 0.35396069]),
        "clustered": ([-1.3900646, -0.07007786, -0.29697797], [0.62685984, 1.46372163, 0.53195047]),
    }
    for g, (im, tx) in expect.items():
        w = SyntheticWorld(seed=0, dim=64, geometry=g)
        meta, image, text = w.sample(0, 3)
        assert meta.column("caption").to_pylist() == [
            "a wide shot of a classroom", "a palm, a doctor and a dog", "a blurry photo of three tents"]
        np.testing.assert_allclose(image[0, :3], im, rtol=1e-5, err_msg=g)
        np.testing.assert_allclose(text[2, :3], tx, rtol=1e-5, err_msg=g)
        assert "tails" not in w.params()


@pytest.mark.parametrize("geometry", HEAVY_WORLDS)
def test_heavy_world_is_deterministic_valid_and_clip_like(geometry):
    st = world_stats(geometry)
    # deterministic: a fresh world gives the same rows, also for a range that straddles a block
    m2, i2, t2 = SyntheticWorld(seed=0, geometry=geometry).sample(BLOCK_SIZE - 5, 10)
    fresh = SyntheticWorld(seed=0, geometry=geometry).sample(0, BLOCK_SIZE + 5)
    assert m2.equals(fresh[0].slice(BLOCK_SIZE - 5, 10))
    np.testing.assert_array_equal(i2, fresh[1][BLOCK_SIZE - 5:])
    np.testing.assert_array_equal(t2, fresh[2][BLOCK_SIZE - 5:])
    np.testing.assert_array_equal(fresh[1][:NH], st["image"])
    np.testing.assert_array_equal(fresh[2][:NH], st["text"])
    assert not np.allclose(SyntheticWorld(seed=1, geometry=geometry).sample(0, 50)[1], st["image"][:50])
    # stored (normalised) vectors: finite, unit norm
    for raw in (st["image"], st["text"]):
        assert raw.dtype == np.float32 and np.all(np.isfinite(raw))
        v = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # CLIP-like: matched pairs clearly above random pairs, on average and for most samples
    matched = np.einsum("ij,ij->i", st["vi"], st["vt"])
    random_pairs = mean_offdiag_cos(st["vi"], st["vt"])
    assert matched.mean() - random_pairs >= 0.1, (matched.mean(), random_pairs)
    assert (matched > np.einsum("ij,ij->i", st["vi"], np.roll(st["vt"], 1, axis=0))).mean() > 0.8
    params = SyntheticWorld(seed=0, dim=32, geometry=geometry).params()
    assert params["geometry"] == geometry and json.loads(json.dumps(params))["tails"]


def near_duplicate_share(vi: np.ndarray, threshold: float = 0.95) -> float:
    """Share of images with another image of cosine above ``threshold``."""
    s = vi @ vi.T
    np.fill_diagonal(s, -1.0)
    return float((s.max(1) > threshold).mean())


def test_mixture_world_has_spread_noise_levels_and_kl():
    """Per-sample noise scales from a log-normal mixture: matched cosines spread out (generic and
    specific pairs), and so does the per-query KL on both sides."""
    cal, mix = world_stats("calibrated"), world_stats("mixture")
    m_cal = np.einsum("ij,ij->i", cal["vi"], cal["vt"])
    m_mix = np.einsum("ij,ij->i", mix["vi"], mix["vt"])
    assert m_mix.std() > 2.0 * m_cal.std(), (m_mix.std(), m_cal.std())
    for side in ("text", "image"):
        assert mix[f"kl_{side}"].std() > 1.12 * cal[f"kl_{side}"].std(), side
        # both tails move: more generic queries (low KL) and more specific ones (high KL)
        assert np.percentile(mix[f"kl_{side}"], 5) < np.percentile(cal[f"kl_{side}"], 5) - 0.2, side


def test_duplicates_world_has_clusters_of_near_identical_images_with_own_captions():
    cal, dup = world_stats("calibrated"), world_stats("duplicates")
    assert near_duplicate_share(cal["vi"]) < 0.01
    assert near_duplicate_share(dup["vi"]) > 0.2
    s = dup["vi"] @ dup["vi"].T
    np.fill_diagonal(s, -1.0)
    big = np.argmax((s > 0.95).sum(1))  # the image with the most near duplicates: its cluster
    cluster = np.flatnonzero(s[big] > 0.95).tolist() + [int(big)]
    assert len(cluster) >= 20, len(cluster)
    captions = dup["meta"].column("caption").to_pylist()
    concepts = dup["meta"].column("concepts").to_pylist()
    assert len({captions[i] for i in cluster}) > 1  # captions written anew for each duplicate
    assert all(concepts[i] == concepts[cluster[0]] for i in cluster)  # same content
    # a caption shares its softmax with its image's duplicates: a long low tail of kl_text
    assert np.percentile(dup["kl_text"], 5) < np.percentile(cal["kl_text"], 5) - 0.5
    assert dup["kl_text"].std() > 1.12 * cal["kl_text"].std()


def test_templates_world_has_generic_captions_that_match_many_images_weakly():
    from clip_density_index.indexer.synthetic import GENERIC_CAPTIONS

    cal, tpl = world_stats("calibrated"), world_stats("templates")
    captions = np.array(tpl["meta"].column("caption").to_pylist())
    generic = np.isin(captions, GENERIC_CAPTIONS)
    assert 0.08 < generic.mean() < 0.12, generic.mean()
    world = SyntheticWorld(seed=0)
    assert all(world.concepts_in(c) == [] for c in GENERIC_CAPTIONS)
    for c in set(captions[generic]):  # one fixed embedding per generic string
        rows = tpl["text"][captions == c]
        assert np.all(rows == rows[0])
    # weakly close to every image: above a random caption, and their own image is no special match
    cos = tpl["vt"][generic] @ tpl["vi"].T
    assert cos.mean() > mean_offdiag_cos(tpl["vi"], tpl["vt"]) + 0.03
    own = np.einsum("ij,ij->i", tpl["vt"][generic], tpl["vi"][generic])
    assert abs(own.mean() - cos.mean()) < 0.02
    # a generic caption's softmax over the images is broad; images feel the generic captions too
    assert np.median(tpl["kl_text"][generic]) < np.percentile(cal["kl_text"], 5)
    assert np.percentile(tpl["kl_image"], 5) < np.percentile(cal["kl_image"], 5) - 0.4


def test_hubs_world_has_candidates_in_many_top_lists():
    """Hubness: the k-occurrence (how many queries' top-10 a candidate is in) is far more skewed."""
    from scipy.stats import skew

    cal, hub = world_stats("calibrated"), world_stats("hubs")
    for side in ("text", "image"):
        assert skew(hub[f"nk_{side}"]) > 1.5 * skew(cal[f"nk_{side}"]), side
        assert hub[f"nk_{side}"].max() > 1.5 * cal[f"nk_{side}"].max(), side
    assert hub["hub_share_text"] > cal["hub_share_text"] + 0.02


def test_heavy_world_combines_all_four():
    from scipy.stats import skew

    from clip_density_index.indexer.synthetic import GENERIC_CAPTIONS

    cal, hv = world_stats("calibrated"), world_stats("heavy")
    m_cal = np.einsum("ij,ij->i", cal["vi"], cal["vt"])
    m_hv = np.einsum("ij,ij->i", hv["vi"], hv["vt"])
    assert m_hv.std() > 1.5 * m_cal.std()
    assert near_duplicate_share(hv["vi"]) > 0.08
    generic = np.isin(hv["meta"].column("caption").to_pylist(), GENERIC_CAPTIONS).mean()
    assert 0.03 < generic < 0.07, generic
    assert skew(hv["nk_text"]) > 1.5 * skew(cal["nk_text"])
    assert hv["kl_image"].std() > 1.12 * cal["kl_image"].std()

"""indexer.faiss_index: build / save / load / search on small seeded clustered data."""

from __future__ import annotations

import contextlib
import logging

import faiss
import numpy as np
import pytest

from clip_density_index.indexer.choose import estimate_bytes
from clip_density_index.indexer.errors import IndexNotFound, InvalidParameter
from clip_density_index.indexer.faiss_index import (
    build_index,
    gpu_available,
    index_key,
    index_params,
    load_index,
    returns_exact_scores,
    save_index,
    search,
    set_nprobe,
)

N, D = 3000, 32
KEYS = ["Flat", "IVF64,Flat", "IVF64,SQ8", "IVF64,PQ8", "HNSW16,Flat"]
EXACT = {"Flat": True, "IVF64,Flat": True, "IVF64,SQ8": False, "IVF64,PQ8": False, "HNSW16,Flat": True}


def clustered(n: int = N, d: int = D, clusters: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.4 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered()


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return clustered(n=40, seed=1)


@pytest.fixture(scope="module")
def built(data) -> dict[str, faiss.Index]:
    return {key: build_index(key, data, seed=0) for key in KEYS}


def stored_ids(index: faiss.Index) -> np.ndarray:
    """Every id stored in an index built by build_index, sorted."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        invlists = ivf.invlists
        ids = [
            faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
            for i in range(ivf.nlist)
            if invlists.list_size(i)
        ]
        return np.sort(np.concatenate(ids))
    return np.sort(faiss.vector_to_array(faiss.downcast_index(index).id_map))


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ip = q.astype(np.float64) @ x.astype(np.float64).T
    ids = np.argsort(-ip, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ip, ids, axis=1), ids


@pytest.mark.parametrize("key", KEYS)
def test_ids_are_row_numbers(built, key):
    index = built[key]
    assert index.ntotal == N
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    np.testing.assert_array_equal(stored_ids(index), np.arange(N))


@pytest.mark.parametrize("key", ["Flat", "IVF64,Flat", "HNSW16,Flat"])
def test_self_is_top1(built, data, key):
    scores, ids = search(built[key], data[:100], 1, nprobe=64)
    np.testing.assert_array_equal(ids[:, 0], np.arange(100))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_flat_equals_numpy(built, data, queries):
    k = 25
    scores, ids = search(built["Flat"], queries, k)
    ref_scores, ref_ids = exact_topk(data, queries, k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores.shape == ids.shape == (len(queries), k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


@pytest.mark.parametrize("key", ["IVF64,Flat", "HNSW16,Flat"])
@pytest.mark.parametrize("nprobe", [1, 4])
def test_exact_scores_for_returned_ids(built, data, queries, key, nprobe):
    scores, ids = search(built[key], queries, 20, nprobe=nprobe)
    ok = ids >= 0
    found = data[np.where(ok, ids, 0)].astype(np.float64)
    exact = np.einsum("qd,qkd->qk", queries.astype(np.float64), found)
    np.testing.assert_allclose(scores[ok], exact[ok], atol=1e-5)
    assert np.all(np.diff(np.where(ok, scores, -9.0), axis=1) <= 1e-6)  # best first


def test_ivf_flat_with_all_lists_is_exact(built, data, queries):
    scores, ids = search(built["IVF64,Flat"], queries, 25, nprobe=64)
    ref_scores, ref_ids = exact_topk(data, queries, 25)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


@pytest.mark.parametrize("key", ["IVF64,SQ8", "IVF64,PQ8"])
def test_compressed_indexes_find_neighbours(built, data, queries, key):
    _, ids = search(built[key], queries, 10, nprobe=64)
    _, ref = exact_topk(data, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)])
    assert recall > (0.9 if key.endswith("SQ8") else 0.4)


@pytest.mark.parametrize("key", KEYS)
def test_returns_exact_scores(built, key, tmp_path):
    assert returns_exact_scores(built[key]) is EXACT[key]
    p = tmp_path / "x.faiss"
    save_index(built[key], p)
    assert returns_exact_scores(load_index(p)) is EXACT[key]
    assert returns_exact_scores(load_index(p, mmap=True)) is EXACT[key]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_roundtrip(built, queries, key, mmap, tmp_path):
    p = tmp_path / f"{key.replace(',', '_')}.faiss"
    save_index(built[key], p)
    loaded = load_index(p, mmap=mmap)
    assert loaded.ntotal == N
    assert index_key(loaded) == key
    for nprobe in (None, 3):
        s0, i0 = search(built[key], queries, 15, nprobe=nprobe)
        s1, i1 = search(loaded, queries, 15, nprobe=nprobe)
        np.testing.assert_array_equal(i0, i1)
        np.testing.assert_array_equal(s0, s1)


@pytest.mark.parametrize("key", ["Flat", "IVF64,Flat", "IVF64,SQ8", "IVF64,PQ8"])
def test_file_size_matches_estimate(built, key, tmp_path):
    p = tmp_path / "x.faiss"
    save_index(built[key], p)
    est = estimate_bytes(key, N, D)
    assert abs(p.stat().st_size - est) < 0.05 * est


def test_load_missing_names_the_path(tmp_path):
    p = tmp_path / "nope.faiss"
    with pytest.raises(IndexNotFound, match="nope.faiss"):
        load_index(p)
    with pytest.raises(IndexNotFound, match="nope.faiss"):
        load_index(p, mmap=True)


def test_float16_memmap_input(data, queries, tmp_path):
    path = tmp_path / "emb.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=data.shape)
    mm[:] = data
    mm.flush()
    del mm
    x16 = np.load(path, mmap_mode="r")
    a = build_index("IVF64,Flat", x16, chunk=700, seed=3)
    b = build_index("IVF64,Flat", np.asarray(x16, dtype=np.float32), seed=3)
    np.testing.assert_array_equal(stored_ids(a), np.arange(N))
    for nprobe in (2, 64):
        sa, ia = search(a, queries, 10, nprobe=nprobe)
        sb, ib = search(b, queries, 10, nprobe=nprobe)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(sa, sb)
    # the stored vectors are the float16 values, converted exactly
    exact = np.einsum("qd,qkd->qk", queries.astype(np.float64), np.asarray(x16, np.float64)[ia])
    np.testing.assert_allclose(sa, exact, atol=1e-5)
    f = build_index("Flat", x16, chunk=1000)
    np.testing.assert_array_equal(search(f, queries, 10)[1], exact_topk(np.asarray(x16), queries, 10)[1])


def test_build_is_deterministic(data, queries):
    a = build_index("IVF64,Flat", data, seed=7)
    b = build_index("IVF64,Flat", data, seed=7)
    np.testing.assert_array_equal(faiss.vector_to_array(faiss.downcast_index(a.quantizer).codes),
                                  faiss.vector_to_array(faiss.downcast_index(b.quantizer).codes))
    np.testing.assert_array_equal(search(a, queries, 5, nprobe=2)[1], search(b, queries, 5, nprobe=2)[1])


def test_progress_hook_receives_total(data):
    calls: list[tuple[str, int | None]] = []
    advanced: list[int] = []

    @contextlib.contextmanager
    def progress(label, total):
        calls.append((label, total))
        yield advanced.append

    build_index("IVF64,Flat", data, chunk=1000, progress=progress, label="Adding to FAISS (image)")
    assert calls == [("Adding to FAISS (image)", N)]
    assert advanced == [1000, 1000, 1000]


def test_phase_timings_are_logged(data, caplog):
    with caplog.at_level(logging.INFO, logger="clip_density_index.indexer.faiss_index"):
        build_index("IVF64,Flat", data)
    text = caplog.text
    assert "Training IVF64,Flat on 2,496 vectors:" in text  # default 39 * nlist
    assert "Adding 3,000 vectors to IVF64,Flat:" in text


def test_train_size(data, caplog):
    with caplog.at_level(logging.WARNING, logger="clip_density_index.indexer.faiss_index"):
        index = build_index("IVF64,Flat", data, train_size=500)
    assert "fewer than 39 per list" in caplog.text
    assert index.ntotal == N
    with pytest.raises(InvalidParameter, match="train_size"):
        build_index("IVF64,Flat", data, train_size=N + 1)
    with pytest.raises(InvalidParameter, match="nlist=64"):
        build_index("IVF64,Flat", data, train_size=32)


def test_nprobe_handling(built, queries):
    index = built["IVF64,Flat"]
    set_nprobe(index, 4)
    assert index_params(index)["nprobe"] == 4
    s4, i4 = search(index, queries, 10)
    s16, i16 = search(index, queries, 10, nprobe=16)
    assert index_params(index)["nprobe"] == 4  # a per-call nprobe leaves the index alone
    set_nprobe(index, 16)
    np.testing.assert_array_equal(search(index, queries, 10)[1], i16)
    set_nprobe(index, 1000)  # clamped to nlist
    assert index_params(index)["nprobe"] == 64
    set_nprobe(index, 1)
    with pytest.raises(InvalidParameter, match="nprobe=0"):
        set_nprobe(index, 0)
    with pytest.raises(InvalidParameter, match="nprobe=0"):
        search(index, queries, 10, nprobe=0)
    set_nprobe(built["Flat"], 8)  # no lists: ignored
    np.testing.assert_array_equal(search(built["Flat"], queries, 3, nprobe=8)[1],
                                  search(built["Flat"], queries, 3)[1])


def test_index_params(built):
    p = index_params(built["IVF64,SQ8"])
    assert p == {"key": "IVF64,SQ8", "nlist": 64, "nprobe": p["nprobe"], "exact_scores": False,
                 "ntotal": N, "dim": D, "metric": "inner_product", "gpu": False}
    p = index_params(built["Flat"])
    assert (p["key"], p["nlist"], p["nprobe"], p["exact_scores"]) == ("Flat", None, None, True)
    assert index_params(built["HNSW16,Flat"])["key"] == "HNSW16,Flat"
    assert index_params(built["IVF64,PQ8"])["key"] == "IVF64,PQ8"


def test_missing_results_are_minus_one_and_minus_inf(built, queries):
    scores, ids = search(built["IVF64,Flat"], queries, 500, nprobe=1)
    missing = ids < 0
    assert missing.any()
    assert np.all(np.isneginf(scores[missing]))
    assert np.all(np.isfinite(scores[~missing]))
    # missing slots are at the end of each row
    assert np.all(np.diff(missing.astype(int), axis=1) >= 0)
    # k > ntotal on Flat
    s, i = search(built["Flat"], queries[:2], N + 5)
    assert np.all(i[:, N:] == -1) and np.all(np.isneginf(s[:, N:]))


def test_search_input_checks(built, queries):
    s, i = search(built["Flat"], queries[0], 3)  # one 1-D query
    assert s.shape == i.shape == (1, 3)
    s16, i16 = search(built["Flat"], queries.astype(np.float16), 3)
    assert s16.dtype == np.float32
    with pytest.raises(InvalidParameter, match="k=0"):
        search(built["Flat"], queries, 0)
    with pytest.raises(InvalidParameter, match=r"\(q, 32\)"):
        search(built["Flat"], queries[:, :16], 3)


def test_build_input_checks(data):
    with pytest.raises(InvalidParameter, match="'IVF64,Bogus'"):
        build_index("IVF64,Bogus", data)
    with pytest.raises(InvalidParameter, match="nlist=4096"):
        build_index("IVF4096,Flat", data)
    with pytest.raises(InvalidParameter, match="2-D"):
        build_index("Flat", data[0])
    with pytest.raises(InvalidParameter, match="dtype"):
        build_index("Flat", data.astype(np.int32))


@pytest.mark.skipif(gpu_available(), reason="checks the error raised without a GPU")
def test_use_gpu_without_gpu(data, queries, built):
    with pytest.raises(InvalidParameter, match="GPU"):
        build_index("IVF64,Flat", data, use_gpu=True)
    with pytest.raises(InvalidParameter, match="GPU"):
        search(built["Flat"], queries, 3, use_gpu=True)
    # auto: falls back to the CPU silently
    assert build_index("IVF64,Flat", data, use_gpu=None).ntotal == N


@pytest.mark.skipif(not gpu_available(), reason="needs a faiss GPU build and a GPU")
@pytest.mark.parametrize("key", ["Flat", "IVF64,Flat", "IVF64,SQ8", "IVF64,PQ8"])
def test_gpu_build_matches_cpu(data, queries, key, tmp_path):
    index = build_index(key, data, use_gpu=True)
    assert not index_params(index)["gpu"]  # returned on the CPU, ready to save
    save_index(index, tmp_path / "g.faiss")
    np.testing.assert_array_equal(stored_ids(index), np.arange(N))
    if key in ("Flat", "IVF64,Flat"):
        _, ids = search(index, queries, 10, nprobe=64, use_gpu=True)
        np.testing.assert_array_equal(ids, exact_topk(data, queries, 10)[1])

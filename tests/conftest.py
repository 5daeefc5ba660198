"""Fixtures shared by several test modules, and the two data helpers most modules use
(``from conftest import clustered_pairs, unit32``). Helpers for one kind of data live in named
modules beside this one: ``arrays_pool.py`` (the arrays index and its numpy scores),
``tiny_clip.py`` (a tiny random open_clip model) and ``explorer_pools.py``."""

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest

#: the repository's root (cli.py, examples/, docs/)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def clustered_pairs(n: int, d: int, seed: int = 0, clusters: int = 20):
    """Raw (image, text) embeddings with shared cluster structure, a modality offset and noise."""
    r = np.random.default_rng(seed)
    centers = r.standard_normal((clusters, d))
    z = centers[r.integers(0, clusters, n)]
    gap = r.standard_normal(d)
    image = (z + 0.8 * r.standard_normal((n, d)) + gap) * r.uniform(5, 15, (n, 1))
    text = (z + 0.8 * r.standard_normal((n, d)) - gap) * r.uniform(5, 15, (n, 1))
    return image.astype(np.float32), text.astype(np.float32)


@contextlib.contextmanager
def exact_pass_killed_at(call: int):
    """``queries.exact.exact_moments`` raises KeyboardInterrupt at its ``call``-th call in this
    process (a score run killed in the middle of its exact pass) inside the block, and is itself again
    after it."""
    import clip_density_index.queries.exact as qe

    real, calls = qe.exact_moments, []

    def dying(*a, **kw):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)

    qe.exact_moments = dying
    try:
        yield
    finally:
        qe.exact_moments = real


def unit32(x):
    """Rows scaled to unit length, as float32 (what an index stores)."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def arrays_index(tmp_path_factory):
    """(index dir, raw image, raw text, captions, uids, numpy scores) of a 400-sample Flat index
    with a ``scores`` table computed in numpy (``arrays_pool``)."""
    from arrays_pool import A, DIM, N, captions, numpy_scores, write_scores

    from clip_density_index.indexer.build import build_index
    from clip_density_index.indexer.sources import ArraySource

    root = tmp_path_factory.mktemp("arrays")
    image, text = clustered_pairs(N, DIM, seed=3)
    caps = captions(N)
    src = ArraySource(image, text, captions=caps, logit_scale=A)
    uids = src.meta.column("uid").to_pylist()
    out = root / "idx"
    build_index(src, out)
    cols = numpy_scores(image, text)
    write_scores(out, cols)
    return out, image, text, caps, uids, cols


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: checkpoint path} of the tiny open_clip configs (``tiny_clip``), registered with
    open_clip, with random weights."""
    pytest.importorskip("open_clip")
    pytest.importorskip("torch")
    from tiny_clip import TINY, TINY_BIASED, TINY_CFG, save_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {TINY: save_tiny_model(root, TINY),
            TINY_BIASED: save_tiny_model(root, TINY_BIASED, TINY_CFG | {"init_logit_bias": -10.0})}


@contextlib.contextmanager
def tests_on_worker_path():
    """The tests folder on PYTHONPATH while a Ray node starts: its workers import the test modules'
    task functions and sources. This process's environment is restored after."""
    here = str(Path(__file__).parent)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([here] + ([old] if old else []))
    try:
        yield
    finally:
        os.environ.pop("PYTHONPATH") if old is None else os.environ.__setitem__("PYTHONPATH", old)


@pytest.fixture(scope="module")
def ray_engine():
    """A Ray engine on a local cluster of 2 CPUs, for one test module (``tests_on_worker_path``)."""
    pytest.importorskip("ray")
    from clip_density_index.indexer.engine import open_engine

    with tests_on_worker_path():
        engine = open_engine("ray", num_cpus=2)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def ray_cluster():
    """``(cluster, engine)``: a Ray cluster of two nodes on this machine (``ray.cluster_utils.Cluster``:
    a head and a second node, 1 CPU each) and a Ray engine that joined it by its address, for one
    test module (``tests_on_worker_path``)."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from clip_density_index.indexer.engine import open_engine

    with tests_on_worker_path():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        cluster.add_node(num_cpus=1)
    try:
        cluster.wait_for_nodes()
        engine = open_engine("ray", address=cluster.address)
        yield cluster, engine
        engine.close()
    finally:
        cluster.shutdown()

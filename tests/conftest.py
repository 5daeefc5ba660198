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


def unit32(x):
    """Rows scaled to unit length, as float32 (what an index stores)."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def ray_engine():
    """A Ray engine on a local cluster of 2 CPUs, for one test module. Its workers start with the tests
    folder on their path, so that they import the test modules' task functions and sources."""
    pytest.importorskip("ray")
    from clip_density_index.indexer.engine import open_engine

    here = str(Path(__file__).parent)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([here] + ([old] if old else []))
    try:
        engine = open_engine("ray", num_cpus=2)
    finally:
        os.environ.pop("PYTHONPATH") if old is None else os.environ.__setitem__("PYTHONPATH", old)
    yield engine
    engine.close()

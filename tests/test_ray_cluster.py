"""A Ray cluster of two nodes (``ray.cluster_utils.Cluster`` on this machine, 1 CPU each) joined by
address: tasks and actors run on both nodes, and ``score`` (exact, both sides) and ``build_index``
(read by tasks; open_clip encoded by an actor on each node) on it give the local engine's results."""

import shutil
import time

import numpy as np
import pytest

import test_build_ray
from conftest import clustered_pairs
from test_build_ray import assert_same_encoding, assert_same_index
from test_score_ray import EXACT, KL, stored
from clip_density_index.indexer.build import build_index
from clip_density_index.indexer.sources import ArraySource
from clip_density_index.indexer.synthetic import BLOCK_SIZE, SyntheticSource
from clip_density_index.queries.scoring import score

ray = pytest.importorskip("ray")
encoded = test_build_ray.encoded  # the fixture: a .tar shard, a tiny open_clip model, the local build


def _node(item, shared):
    """The node this task ran on, after a pause long enough that one node's one CPU cannot take
    every task."""
    time.sleep(0.3)
    return ray.get_runtime_context().get_node_id()


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_tasks_and_actors_run_on_both_nodes(ray_cluster):
    _, engine = ray_cluster
    both = alive_nodes()
    assert len(both) == 2 and engine.workers == 2
    assert {node for _, node in engine.map(_node, range(8))} == both
    # two actors of one CPU each: one on each node
    assert {node for _, node in engine.map_actors(_node, range(4))} == both


def test_exact_score_on_two_nodes_equals_local(ray_cluster, tmp_path):
    _, engine = ray_cluster
    image, text = clustered_pairs(4000, 16, seed=5)
    build_index(ArraySource(image, text), tmp_path / "local")
    shutil.copytree(tmp_path / "local", tmp_path / "ray")
    params = {**EXACT, "batch_size": 1000}  # four chunks of captions, four of images
    want = score(tmp_path / "local", **params)
    got = score(tmp_path / "ray", engine=engine, **params)
    assert got.engine == "ray" and got.chunks_computed == want.chunks_computed == 4
    a, b = stored(tmp_path / "ray"), stored(tmp_path / "local")
    for c in KL:
        np.testing.assert_allclose(a[c], b[c], rtol=1e-9, atol=1e-9, err_msg=c)


def test_build_on_two_nodes_equals_local(ray_cluster, tmp_path):
    _, engine = ray_cluster
    n, key = 2 * BLOCK_SIZE + 300, dict(index_key="IVF16,Flat", cov_sample=3000)  # three parts
    build_index(SyntheticSource(n=n, dim=16), tmp_path / "local", **key)
    report = build_index(SyntheticSource(n=n, dim=16), tmp_path / "ray", engine=engine, **key)
    assert report.engine == "ray" and report.n == n
    assert_same_index(tmp_path / "local", tmp_path / "ray")
    for m in ("image", "text"):
        assert (tmp_path / "ray" / f"{m}.faiss").read_bytes() == (tmp_path / "local" / f"{m}.faiss").read_bytes()


def test_open_clip_on_two_nodes_equals_local(ray_cluster, encoded, tmp_path):
    _, engine = ray_cluster
    source, local = encoded
    report = build_index(source(), tmp_path / "ray", engine=engine)
    assert (report.n, report.skipped) == (10, 1)
    assert_same_encoding(local, tmp_path / "ray")
    loaded = [p.name.split("-")[1] for p in (tmp_path / "marks").glob("loaded-*")]
    assert len(set(loaded)) == len(loaded) == 2  # one actor per node, one model each, for three parts

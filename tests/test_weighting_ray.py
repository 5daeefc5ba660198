"""``weights`` and ``sample`` over a partitioned pool (queries/weights_engine.py): on a real local
Ray cluster (2 CPUs) the same weights, the same top rows and the same seeded draws as the local
engine; a worker killed mid-run costs only its partition; the normalisation partials of any split
of the pool merge to those of one block."""

import os
import shutil
import signal
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scipy.special import logsumexp

from clip_density_index import cli
from conftest import clustered_pairs
from clip_density_index.indexer.build import build_index
from clip_density_index.indexer.engine import LocalEngine
from clip_density_index.indexer.errors import BrokenIndex, InvalidParameter, ParameterClash
from clip_density_index.indexer.sources import ArraySource
from clip_density_index.queries import weights_engine
from clip_density_index.queries.sqlrun import run_sql
from clip_density_index.queries.weighting import compute_weights, gumbel_noise, sample, weights
from clip_density_index.queries.weights_engine import LogSums, merge_sums, partitions

ray = pytest.importorskip("ray")

N, DIM = 20_000, 32
#: Images per partition in these tests: 7 partitions of the 20k pool, the last one shorter.
ROWS = 3000


@pytest.fixture(scope="module")
def engine(ray_engine):
    """The module's Ray cluster (conftest's ``ray_engine``: its workers import this module's task
    wrapper ``_dies_once``)."""
    return ray_engine


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """A 20k-pair Flat index (its FAISS top n is exact too)."""
    image, text = clustered_pairs(N, DIM, seed=21)
    out = tmp_path_factory.mktemp("ray-weights") / "idx"
    build_index(ArraySource(image, text), out, index_key="Flat")
    return out


@pytest.fixture(scope="module")
def prompt():
    return np.random.default_rng(4).standard_normal(DIM)


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


# -- the partial and the noise, without a cluster --------------------------------------------------


def test_partials_of_blocks_merge_to_one_block():
    rng = np.random.default_rng(0)
    x = 800 * rng.uniform(-1, 1, 50_000)  # log weights spanning 1600: exp overflows without log space
    whole = LogSums.of(x)
    cuts = np.sort(rng.choice(np.arange(1, x.size), 40, replace=False))
    blocks = [LogSums.of(b) for b in np.split(x, cuts)]
    for parts in (blocks, blocks[::-1], [LogSums.of(x[:0])] + blocks):  # any order, an empty block
        merged = merge_sums(parts)
        assert merged.n == x.size and merged.max == whole.max
        assert merged.log_sum == pytest.approx(whole.log_sum, rel=1e-14)
        assert merged.ess == pytest.approx(whole.ess, rel=1e-12)
    folded = blocks[0]
    for b in blocks[1:]:  # a left fold is another tree: the same sums
        folded = folded.merge(b)
    assert folded.ess == pytest.approx(whole.ess, rel=1e-12)
    # against scipy, from the definitions
    assert whole.log_sum == pytest.approx(logsumexp(x), rel=1e-14)
    assert whole.log_mean == pytest.approx(logsumexp(x) - np.log(x.size), rel=1e-14)
    assert whole.ess == pytest.approx(np.exp(2 * logsumexp(x) - logsumexp(2 * x)), rel=1e-12)


def test_partitions_cover_the_pool_once():
    for n, workers, rows in [(20_000, 2, None), (20_000, 2, ROWS), (5, 8, None), (3_000_000, 2, None)]:
        parts = partitions(n, workers, rows)
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:])) and all(lo < hi for lo, hi in parts)
    assert len(partitions(20_000, 2)) == 4  # two per worker
    assert max(hi - lo for lo, hi in partitions(3_000_000, 2)) <= weights_engine.PARTITION_ROWS
    with pytest.raises(InvalidParameter, match="partition_rows must be a positive integer, got 0"):
        partitions(10, 1, 0)


def test_the_noise_of_a_range_is_that_of_the_local_draw():
    full = np.random.default_rng(9).gumbel(size=N)
    for lo, hi in [(0, 1), (0, ROWS), (ROWS, 2 * ROWS), (12_345, N), (N - 1, N)]:
        np.testing.assert_array_equal(gumbel_noise(9, lo, hi), full[lo:hi])


def test_partitions_in_this_process_give_the_local_results(index, prompt):
    """An open LocalEngine runs the partitions' tasks here: the merge logic without a cluster."""
    eng = LocalEngine()
    local = compute_weights(index, prompt_embedding=prompt, logit_scale=40)
    parts = compute_weights(index, prompt_embedding=prompt, logit_scale=40, engine=eng, partition_rows=ROWS)
    assert rel(parts.normalized_weight, local.normalized_weight) < 1e-12
    assert parts.ess == pytest.approx(local.ess, rel=1e-12)
    for kw in (dict(mode="top", n=ROWS + 10), dict(mode="draw", n=ROWS + 10, seed=2)):
        assert (sample(index, prompt_embedding=prompt, engine=eng, partition_rows=ROWS, **kw).column("vec_id")
                == sample(index, prompt_embedding=prompt, **kw).column("vec_id"))


# -- on the Ray cluster ----------------------------------------------------------------------------


def test_ray_weights_equal_local(engine, index, prompt, tmp_path):
    np.save(tmp_path / "p.npy", prompt)
    local = weights(index, prompt="local", prompt_embedding=prompt, out=tmp_path / "local.parquet")
    remote = weights(index, prompt="ray", prompt_embedding=prompt, out=tmp_path / "ray.parquet", engine=engine,
                     partition_rows=ROWS)
    assert remote.n == N and remote.stored
    np.testing.assert_allclose(remote.cosine, local.cosine, rtol=0, atol=1e-15)
    assert rel(remote.normalized_weight, local.normalized_weight) < 1e-12
    assert rel(remote.weight, local.weight) < 1e-12
    assert remote.ess == pytest.approx(local.ess, rel=1e-12)
    for key, value in local.summary().items():
        assert remote.summary()[key] == pytest.approx(value, rel=1e-12), key
    # stored by the driver through the Store, as local stores them: one row per image
    stored = {p: run_sql(index, "SELECT vec_id, normalized_weight FROM weights WHERE prompt = $p ORDER BY vec_id",
                         {"p": p}) for p in ("local", "ray")}
    assert stored["ray"].column("vec_id").to_pylist() == list(range(N))
    assert rel(stored["ray"].column(1).to_numpy(), stored["local"].column(1).to_numpy()) < 1e-12
    a, b = pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "ray.parquet")
    assert a.column("uid") == b.column("uid")
    assert rel(b.column("normalized_weight").to_numpy(), a.column("normalized_weight").to_numpy()) < 1e-12
    # a' large enough that the weights overflow outside log space: the merged normalisation still holds
    big = compute_weights(index, prompt_embedding=prompt, logit_scale=2000, engine=engine, partition_rows=ROWS)
    ref = compute_weights(index, prompt_embedding=prompt, logit_scale=2000)
    ok = ref.normalized_weight > 1e-300
    assert ok.sum() >= 5 and rel(big.normalized_weight[ok], ref.normalized_weight[ok]) < 1e-12


def test_ray_top_is_the_local_top(engine, index, prompt):
    for n in (25, ROWS + 500):  # within one partition; across partitions
        remote = sample(index, prompt_embedding=prompt, n=n, mode="top", engine=engine, partition_rows=ROWS)
        exact = sample(index, prompt_embedding=prompt, n=n, mode="top", exact=True)
        default = sample(index, prompt_embedding=prompt, n=n, mode="top")
        assert remote.column("vec_id").to_pylist() == exact.column("vec_id").to_pylist()
        assert remote.column("vec_id").to_pylist() == default.column("vec_id").to_pylist()
        assert remote.column("uid") == exact.column("uid") and remote.column("caption") == exact.column("caption")
        np.testing.assert_allclose(remote.column("cosine").to_numpy(), exact.column("cosine").to_numpy(),
                                   rtol=0, atol=1e-15)
    assert remote.column_names == exact.column_names


def test_ray_top_breaks_ties_by_vec_id_as_local(engine, tmp_path):
    """Equal cosines across partitions: the lowest vec_ids win, as in the local --exact."""
    image, text = clustered_pairs(2000, 8, seed=5)
    image[1500::100] = image[7]  # 5 copies of image 7 in later partitions
    image[300] = image[7]
    out = tmp_path / "ties"
    build_index(ArraySource(image, text), out, index_key="Flat")
    v = image[7].astype(np.float64)  # the copies are the top 7, all tied
    for n in (3, 6, 40):
        remote = sample(out, prompt_embedding=v, n=n, mode="top", engine=engine, partition_rows=256)
        exact = sample(out, prompt_embedding=v, n=n, mode="top", exact=True)
        assert remote.column("vec_id").to_pylist() == exact.column("vec_id").to_pylist()
    assert remote.column("vec_id").to_pylist()[:7] == [7, 300, 1500, 1600, 1700, 1800, 1900]


def test_ray_draw_is_the_local_draw(engine, index, prompt):
    for seed in (0, 7):
        remote = sample(index, prompt_embedding=prompt, n=ROWS + 10, seed=seed, engine=engine, partition_rows=ROWS)
        local = sample(index, prompt_embedding=prompt, n=ROWS + 10, seed=seed)
        assert remote.column("vec_id").to_pylist() == local.column("vec_id").to_pylist()
        assert remote.column_names == local.column_names
        assert rel(remote.column("normalized_weight").to_numpy(), local.column("normalized_weight").to_numpy()) < 1e-12
    other = sample(index, prompt_embedding=prompt, n=50, seed=1, engine=engine, partition_rows=ROWS)
    assert other.column("vec_id").to_pylist() != remote.column("vec_id").to_pylist()[:50]
    # with replacement: the same uniforms through the cumulative weights, partition by partition
    remote = sample(index, prompt_embedding=prompt, n=3 * N, seed=3, replace=True, logit_scale=30, engine=engine,
                    partition_rows=ROWS)
    local = sample(index, prompt_embedding=prompt, n=3 * N, seed=3, replace=True, logit_scale=30)
    ids = remote.column("vec_id").to_numpy()
    assert len(np.unique(ids)) < len(ids)  # repeats: drawn with replacement
    assert np.array_equal(ids, local.column("vec_id").to_numpy())
    assert rel(remote.column("normalized_weight").to_numpy(), local.column("normalized_weight").to_numpy()) < 1e-12


def _dies_once(item, packed):
    """The task ``packed[0]`` on its item, but the first task of the run kills its own worker first
    (the marker file in ``packed[2]`` says it happened); each finished task leaves a ``ran-`` file."""
    task, shared, marks = packed
    if isinstance(shared, ray.ObjectRef):
        shared = ray.get(shared)
    try:
        fd = os.open(Path(marks) / "died", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pass
    else:
        os.write(fd, str(item[0]).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
    result = task(item, shared)
    (Path(marks) / f"ran-{item[0]}-{uuid.uuid4().hex}").write_text("")
    return result


class KillsAWorker:
    """The Ray engine, with each task wrapped by ``_dies_once``."""

    name = "ray"

    def __init__(self, inner, marks: Path):
        self.inner, self.marks = inner, marks

    @property
    def workers(self):
        return self.inner.workers

    def put(self, obj):
        return self.inner.put(obj)

    def map(self, task, items, shared=None, **resources):
        return self.inner.map(_dies_once, items, (task, shared, str(self.marks)), **resources)


def test_a_killed_worker_costs_only_its_partition(engine, index, prompt, tmp_path):
    local = compute_weights(index, prompt_embedding=prompt)
    marks = tmp_path / "marks"
    marks.mkdir()
    remote = compute_weights(index, prompt_embedding=prompt, engine=KillsAWorker(engine, marks), partition_rows=ROWS)
    killed = int((marks / "died").read_text())
    assert killed in [lo for lo, _ in partitions(N, 2, ROWS)]
    ran = sorted(int(p.name.split("-")[1]) for p in marks.glob("ran-*"))
    assert ran == [lo for lo, _ in partitions(N, 2, ROWS)]  # every partition once, the killed one rerun
    assert rel(remote.normalized_weight, local.normalized_weight) < 1e-12
    assert remote.ess == pytest.approx(local.ess, rel=1e-12)


def test_a_task_error_is_the_local_one_line(engine, index, prompt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(index, bad)
    emb = np.load(bad / "image_emb.npy", mmap_mode="r+")
    emb[12_345, 0] = np.nan
    emb.flush()
    del emb
    with pytest.raises(BrokenIndex) as local:
        compute_weights(bad, prompt_embedding=prompt)
    with pytest.raises(BrokenIndex) as remote:
        compute_weights(bad, prompt_embedding=prompt, engine=engine, partition_rows=ROWS)
    assert str(remote.value) == str(local.value) and "row 12345" in str(local.value)
    assert "\n" not in str(remote.value)


def test_cli_engine_ray(engine, index, prompt, tmp_path):
    path = tmp_path / "p.npy"
    np.save(path, prompt)
    runner = CliRunner()
    base = ["weights", str(index), "--prompt-embedding", str(path), "--prompt", "cli"]
    local, remote = runner.invoke(cli.cli, base), runner.invoke(cli.cli, base + ["--engine", "ray"])
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    assert remote.output == local.output and "ESS" in remote.output
    args = ["sample", str(index), "--prompt-embedding", str(path), "-n", "5", "--seed", "3"]
    local, remote = runner.invoke(cli.cli, args), runner.invoke(cli.cli, args + ["--engine", "ray"])
    assert remote.exit_code == 0 and remote.output == local.output, remote.output
    r = runner.invoke(cli.cli, args + ["--mode", "top", "--nprobe", "3", "--engine", "ray"])
    assert r.exit_code == 2 and "--nprobe applies to the FAISS search of --engine local" in r.output
    r = runner.invoke(cli.cli, args + ["--address", "auto"])
    assert r.exit_code == 1 and "--address needs --engine ray" in r.output
    with pytest.raises(ParameterClash, match="^nprobe applies"):
        sample(index, prompt_embedding=prompt, n=5, mode="top", nprobe=3, engine=engine)

"""Hostile sizes: empty data files, and parameters that ask for more memory
than the machine has. Each must end in one ``Error:`` line naming the file or the number, never in
a bare "Aborted!", a traceback or the kernel's OOM killer."""

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner

from clip_density_index import cli
from conftest import clustered_pairs
from clip_density_index.indexer.build import build_index
from clip_density_index.indexer.errors import BrokenIndex
from clip_density_index.indexer.pool import open_index
from clip_density_index.indexer.sources import ArraySource

N, DIM = 300, 16


@pytest.fixture
def small_index(tmp_path):
    image, text = clustered_pairs(N, DIM, seed=4)
    out = tmp_path / "idx"
    build_index(ArraySource(image, text), out)
    np.save(tmp_path / "p.npy", image[0])
    return out, tmp_path / "p.npy"


def one_error_line(result, *needles):
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Aborted" not in result.output and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def drop_checksums(out):
    """An index as builds before the data_files checksums left it: only headers are checked on open."""
    with duckdb.connect(str(out / "catalog.duckdb")) as con:
        con.execute("DROP TABLE IF EXISTS data_files")


@pytest.mark.parametrize("name", ["image_emb.npy", "text_emb.npy", "image_rawnorm.npy", "text_rawnorm.npy"])
@pytest.mark.parametrize("checksums", [True, False])
def test_an_empty_data_file_is_named(small_index, name, checksums):
    out, prompt = small_index
    if not checksums:
        drop_checksums(out)
    (out / name).write_bytes(b"")
    runner = CliRunner()
    for args in (["score", str(out), "--metrics", "kl,dw,rawnorm"],
                 ["weights", str(out), "--prompt-embedding", str(prompt)],
                 ["sample", str(out), "--prompt-embedding", str(prompt), "-n", "3"]):
        if name != "image_emb.npy" and args[0] != "score":
            continue  # weights and sample read the image embeddings only
        one_error_line(runner.invoke(cli.cli, args), name)


def test_a_file_emptied_after_the_index_was_opened_is_named(small_index):
    out, _ = small_index
    pool = open_index(out)
    (out / "text_emb.npy").write_bytes(b"")
    with pytest.raises(BrokenIndex, match="text_emb.npy"):
        pool.embeddings("text")


# -- 12: resource limits --------------------------------------------------------------------------
def test_build_index_with_a_huge_dim_is_refused_with_the_number_before_any_work(tmp_path):
    """``--dim 100000`` is refused at once: unchecked, it is a numpy MemoryError traceback (74.5 GiB
    for one d x d matrix) after ~30 s of building the synthetic world."""
    out = tmp_path / "idx"
    r = CliRunner().invoke(cli.cli, ["build-index", "--dim", "100000", "--n", "1000", "--out", str(out)])
    one_error_line(r, "--dim 100,000", "would need about", "TiB", "available")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_the_stats_of_a_huge_dimension_are_refused_whatever_the_source():
    from clip_density_index.indexer.errors import TooMuchMemory
    from clip_density_index.indexer.stats import StatsAccumulator

    with pytest.raises(TooMuchMemory, match="dimension 1,000,000 .*7.3 TiB each"):
        StatsAccumulator(1_000_000, raw=True)


def test_sample_with_replacement_is_refused_before_drawing_when_it_cannot_fit(small_index, tmp_path):
    """Unchecked, ``-n 50000000 --replace`` is killed by the kernel after 24 GB, and more rows than
    memory can hold (here 10^11) are a numpy MemoryError traceback."""
    from clip_density_index.indexer.errors import TooMuchMemory
    from clip_density_index.queries.weighting import sample

    out, prompt = small_index
    with pytest.raises(TooMuchMemory, match=r"sample -n 100,000,000,000 --replace .* would need about .* TiB"):
        sample(out, prompt_embedding=prompt, n=10**11, replace=True, out=tmp_path / "s.parquet")
    assert not (tmp_path / "s.parquet").exists()
    r = CliRunner().invoke(cli.cli, ["sample", str(out), "--prompt-embedding", str(prompt), "-n", str(10**11),
                                     "--replace"])
    one_error_line(r, "sample -n 100,000,000,000 --replace", "available", "--out FILE.parquet")


def test_the_sample_check_follows_the_memory_available(small_index, tmp_path, monkeypatch):
    from clip_density_index.indexer import memory
    from clip_density_index.indexer.errors import TooMuchMemory
    from clip_density_index.queries.weighting import sample, sample_bytes

    out, prompt = small_index
    monkeypatch.setattr(memory, "available_bytes", lambda: 256 * 2**20)
    n = 2_000_000  # ~0.5 GiB to parquet: over 80% of 256 MiB
    assert sample_bytes(n, N, 40, "parquet") > 0.8 * 256 * 2**20
    with pytest.raises(TooMuchMemory, match="256.0 MiB available; ask for fewer rows"):
        sample(out, prompt_embedding=prompt, n=n, replace=True, out=tmp_path / "s.parquet")
    with pytest.raises(TooMuchMemory, match="write .parquet instead"):
        sample(out, prompt_embedding=prompt, n=n // 4, replace=True, out=tmp_path / "s.csv")
    t = sample(out, prompt_embedding=prompt, n=200_000, replace=True, out=tmp_path / "ok.parquet")
    assert t.num_rows == 200_000 and (tmp_path / "ok.parquet").exists()

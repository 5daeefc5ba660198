"""Hostile sizes (issue 15, items 6 and 12): empty data files, and parameters that ask for more memory
than the machine has. Each must end in one ``Error:`` line naming the file or the number, never in
a bare "Aborted!", a traceback or the kernel's OOM killer."""

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner

import cli
from conftest import clustered_pairs
from indexer.build import build_index
from indexer.errors import BrokenIndex
from indexer.pool import open_index
from indexer.sources import ArraySource

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

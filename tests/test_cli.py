"""The command line: help text with examples, error mapping, build-index and info end to end."""

import pytest
from click.testing import CliRunner

from clip_density_index import cli
from clip_density_index.indexer.pool import open_index


@pytest.mark.parametrize("name", sorted(cli.cli.commands))
def test_every_command_has_help_with_an_example(name):
    command = cli.cli.commands[name]
    assert command.help and "Example" in command.help, f"{name} needs help text with an example"
    for param in command.params:
        if param.param_type_name == "option":
            assert param.help, f"{name} {param.opts} needs help="


def test_build_index_synthetic_then_info(tmp_path):
    runner = CliRunner()
    out = tmp_path / "idx"
    result = runner.invoke(cli.cli, ["build-index", "--n", "3000", "--dim", "32", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" in result.output and "3,000 samples" in result.output
    pool = open_index(out)
    assert pool.synthetic and pool.n == 3000 and pool.dim == 32 and pool.manifest["source"] == "synthetic"
    result = runner.invoke(cli.cli, ["info", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("SYNTHETIC DATA")
    assert "samples" in result.output and "3000" in result.output
    assert "  index_params.image  " in result.output and "key=Flat" in result.output  # one line each, no dict repr
    assert "{'" not in result.output


def test_errors_are_one_line_without_traceback(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli.cli, ["info", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert "Error: Index directory" in result.output and "missing" in result.output
    assert "Traceback" not in result.output


def test_option_clashes_are_usage_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli.cli, ["build-index", "--source", "datacomp", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--input is required" in result.output
    result = runner.invoke(cli.cli, ["build-index", "--max-memory", "lots", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "lots" in result.output

    for args, message in [
        (["--arch", "l14"], "--arch applies only to --source datacomp, not synthetic"),
        (["--logit-scale", "5"], "--logit-scale applies only to --source datacomp / clip-retrieval"),
        (["--uid-column", "key"], "--uid-column applies only to --source open_clip / clip-retrieval"),
        (["--n", "1"], "1 is not in the range x>=2"),
        (["--source", "open_clip", "--input", str(tmp_path)], "--pretrained is required with --source open_clip"),
    ]:
        result = runner.invoke(cli.cli, ["build-index", *args, "--out", str(tmp_path / "x")])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "x").exists()
    result = runner.invoke(cli.cli, ["build-index", "--n", "300", "--dim", "8", "--out", str(tmp_path / "i"), "-q"])
    assert result.exit_code == 0
    result = runner.invoke(cli.cli, ["score", str(tmp_path / "i"), "--exact", "--k", "3"])
    assert result.exit_code == 2 and "--k only applies to --estimator mimps, not to exact" in result.output
    for args, message in [
        (["--estimator", "strata", "--nprobe", "2"], "--nprobe only applies to --estimator mimps, not to strata"),
        (["--estimator", "exact", "--max-fraction", "0.2"], "--max-fraction only applies to --estimator strata"),
        (["--estimator", "mimps", "--paper-sample", "0.1"], "--paper-sample only applies to --estimator paper"),
        (["--paper-sample", "0.1"], "--paper-sample only applies to --estimator paper, not to auto"),
    ]:
        result = runner.invoke(cli.cli, ["score", str(tmp_path / "i"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(cli.cli, ["score", str(tmp_path / "i"), "--metrics", ""])
    assert result.exit_code == 1 and "metrics is empty" in result.output
    result = runner.invoke(cli.cli, ["sample", str(tmp_path / "i"), "--prompt", "a dog", "-n", "2", "--seed", "-1"])
    assert result.exit_code == 2 and "-1 is not in the range" in result.output


def test_build_index_says_when_it_replaces_and_when_n_exceeds_the_input(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "cr"
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(root / "img_emb" / "img_emb_0.npy", rng.standard_normal((40, 8)).astype(np.float32))
    np.save(root / "text_emb" / "text_emb_0.npy", rng.standard_normal((40, 8)).astype(np.float32))
    pq.write_table(pa.table({"caption": [f"c{i}" for i in range(40)]}), root / "metadata" / "metadata_0.parquet")
    runner = CliRunner()
    args = ["build-index", "--source", "clip-retrieval", "--input", str(root), "--out", str(tmp_path / "i"), "-q"]
    result = runner.invoke(cli.cli, [*args, "--n", "100"])
    assert result.exit_code == 0, result.output
    assert "--n 100 but" in result.output and "holds 40 samples" in result.output
    assert "replaced" not in result.output and open_index(tmp_path / "i").n == 40
    result = runner.invoke(cli.cli, [*args, "--n", "30"])
    assert result.exit_code == 0 and "replaced the previous index" in result.output, result.output
    assert "holds" not in result.output and open_index(tmp_path / "i").n == 30


def test_score_summary_names_what_each_side_searched(tmp_path):
    runner = CliRunner()
    out = tmp_path / "idx"
    result = runner.invoke(cli.cli, ["build-index", "--n", "3000", "--dim", "32", "--out", str(out),
                                     "--index-factory", "IVF16,Flat", "--nprobe", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli.cli, ["score", str(out), "--exact", "--metrics", "kl", "-q"])
    assert result.exit_code == 0, result.output
    assert "text side: every candidate, 3,000 dot products per query (100.00% of exact)" in result.output
    assert "None" not in result.output
    result = runner.invoke(cli.cli, ["score", str(out), "--k", "16", "--tail-sample", "64", "--metrics", "kl", "-q"])
    assert result.exit_code == 0, result.output
    assert "text side: IVF16,Flat nprobe 4, " in result.output and "None" not in result.output

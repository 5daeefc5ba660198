"""One fact, one place: the source registry, the defaults the CLI shows, the uid pattern and the
device check; and errors that name the caller's parameters (Python names from the library, flags
from the command line)."""

import inspect
import re

import pytest
from click.testing import CliRunner

from clip_density_index import cli
from clip_density_index.indexer import defaults
from clip_density_index.indexer.errors import BudgetTooSmall, InvalidParameter, ParameterClash
from clip_density_index.indexer.sources import SOURCES, make_source
from conftest import ROOT


def _option(command: str, name: str):
    return next(p for p in cli.cli.commands[command].params if p.name == name)


def test_the_source_registry_drives_the_cli_choice_and_help():
    source = _option("build-index", "source")
    assert list(source.type.choices) == list(SOURCES) and source.default == defaults.SOURCE
    help_ = _option("build-index", "input_path").help
    for kind in SOURCES.values():
        assert (f"{kind.name}: {kind.input}" in help_) == (kind.input is not None), kind.name


def test_make_source_checks_options_by_the_registry_and_names_parameters(tmp_path):
    with pytest.raises(ParameterClash, match=r"^arch applies only to source datacomp, not synthetic$"):
        make_source("synthetic", arch="l14")
    with pytest.raises(ParameterClash, match=r"^uid_column applies only to source open_clip / clip-retrieval, "):
        make_source("datacomp", tmp_path, uid_column="key")
    with pytest.raises(ParameterClash, match=r"^input_path is required with source clip-retrieval$"):
        make_source("clip-retrieval")
    with pytest.raises(ParameterClash, match=r"^input_path cannot be used with source synthetic$"):
        make_source("synthetic", tmp_path)
    with pytest.raises(ParameterClash, match=r"^pretrained is required with source open_clip: "):
        make_source("open_clip", tmp_path)
    with pytest.raises(InvalidParameter, match="choose one of " + ", ".join(SOURCES)) as e:
        make_source("laion")
    assert "--" not in str(e.value)
    src = make_source("synthetic", n=50, dim=8, seed=3)
    assert (src.info.n, src.info.dim, src.info.source) == (50, 8, "synthetic")


def test_a_message_names_parameters_as_each_caller_writes_them():
    e = InvalidParameter.naming("{where} {value!r} failed; {top_fraction} is {f:g}", value="a > '{b}'", f=0.25)
    assert str(e) == "where \"a > '{b}'\" failed; top_fraction is 0.25"
    assert e.spelled(lambda p: "--" + p.replace("_", "-")) == "--where \"a > '{b}'\" failed; --top-fraction is 0.25"
    assert InvalidParameter("plain").spelled(str.upper) == "plain"


def test_library_errors_name_parameters_and_the_cli_its_flags(tmp_path):
    from clip_density_index.indexer.choose import choose_index_key
    from clip_density_index.queries.selection import select

    with pytest.raises(InvalidParameter, match=r"^top_fraction must be in \(0, 1\]") as e:
        select(tmp_path / "idx", "kl_text", 1.5)
    with pytest.raises(InvalidParameter, match=r"^where 'x; drop table samples' contains ';'"):
        select(tmp_path / "idx", "kl_text", 0.5, where="x; drop table samples")
    with pytest.raises(BudgetTooSmall, match=r"Raise max_memory or pass index_key\.$") as e:
        choose_index_key(100_000, 512, 1024)
    assert "--" not in str(e.value)

    runner = CliRunner()
    r = runner.invoke(cli.cli, ["select", str(tmp_path / "idx"), "--by", "kl_text", "--top-fraction", "1.5"])
    assert r.exit_code == 1 and "Error: --top-fraction must be in (0, 1] (e.g. 0.25 keeps a quarter), got 1.5" in r.output
    r = runner.invoke(cli.cli, ["build-index", "--n", "300", "--dim", "8", "--max-memory", "1K", "--seed", "1",
                                "--out", str(tmp_path / "b"), "-q"])
    assert r.exit_code == 1 and "Raise --max-memory or pass --index-factory." in r.output, r.output


def test_cli_defaults_are_the_librarys():
    from clip_density_index.indexer.build import build_index
    from clip_density_index.queries import score_params, scoring, strata, weighting

    def default(f, name):
        return inspect.signature(f).parameters[name].default

    assert _option("build-index", "batch_size").default == default(build_index, "batch_size")
    from clip_density_index.indexer.choose import parse_memory

    assert parse_memory(_option("build-index", "max_memory").default) == default(build_index, "max_memory")
    assert _option("score", "target_spearman").default == default(scoring.score, "target_spearman")
    assert _option("score", "target_overlap").default == default(scoring.score, "target_overlap")
    assert _option("weights", "logit_scale").default == default(weighting.weights, "logit_scale")
    # defaults the library picks itself (the option's own default is None) are the ones its help names
    for command, option, value in [("score", "k", score_params.DEFAULT_K),
                                   ("score", "tail_sample", score_params.DEFAULT_TAIL),
                                   ("score", "strata_target", strata.DEFAULT_TARGET),
                                   ("score", "max_fraction", strata.DEFAULT_MAX_FRACTION),
                                   ("score", "paper_sample", score_params.PAPER_SAMPLE),
                                   ("score", "batch_size", score_params.DEFAULT_BATCH),
                                   ("score", "check", score_params.DEFAULT_CHECK)]:
        assert f"(default {value:g}" in _option(command, option).help, (command, option)
    assert f"exact under {defaults.AUTO_EXACT_BELOW:,} samples" in _option("score", "estimator").help


def test_one_uid_pattern_and_one_device_check():
    product = [p for d in ("indexer", "queries", "explorer") for p in (ROOT / d).rglob("*.py")] + [ROOT / "cli.py"]
    uid = [p.name for p in product if "[0-9a-f]{32}" in p.read_text()]
    assert uid == ["validate.py"]
    device = [p.name for p in product if re.search(r"^def resolve_device", p.read_text(), re.M)]
    assert device == ["device.py"]


def test_resolve_device_returns_a_torch_device_and_names_the_parameter(monkeypatch):
    import torch

    from clip_density_index.indexer.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu") and isinstance(resolve_device("auto"), torch.device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(InvalidParameter, match=r"torch sees no CUDA GPU on this machine \(use device cpu, or auto\)") as e:
        resolve_device("cuda:1")
    assert e.value.spelled(lambda p: "--" + p).endswith("(use --device cpu, or auto)")


def test_atomic_write_makes_the_rename_durable(tmp_path, monkeypatch):
    from clip_density_index.queries import outfile

    synced = []
    monkeypatch.setattr(outfile, "fsync_dir", lambda folder: synced.append(folder))
    path = tmp_path / "sub" / "rows.bin"
    path.parent.mkdir()
    outfile.atomic_write(path, lambda p: p.write_bytes(b"rows"))
    assert path.read_bytes() == b"rows" and synced == [path.parent]
    assert sorted(f.name for f in path.parent.iterdir()) == ["rows.bin"]
    with pytest.raises(InvalidParameter, match=r"already exists; pass force to overwrite it$"):
        outfile.check_out(path, force=False)

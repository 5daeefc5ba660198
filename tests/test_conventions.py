"""Paper conventions (queries/conventions.py): a logit scale that looks like a log warns, the log
form is accepted explicitly (score, build-index), and the paper's floor(fN) + 1 count."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from clip_density_index import cli
from conftest import clustered_pairs
from clip_density_index.indexer.build import build_index
from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.indexer.sources import ArraySource
from clip_density_index.queries.conventions import log_like_warning, resolve_logit_scale
from arrays_pool import kl_both, unit


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    image, text = clustered_pairs(200, 8, seed=4)
    build_index(ArraySource(image, text), root / "idx")
    return root / "idx", image, text


def test_resolve_and_warn():
    assert resolve_logit_scale(None, None) is None
    assert resolve_logit_scale(50.0, None) == 50.0
    assert resolve_logit_scale(None, 4.6052) == pytest.approx(100.0, rel=1e-4)
    with pytest.raises(InvalidParameter, match="not both"):
        resolve_logit_scale(100.0, 4.6)
    for bad in (float("nan"), float("inf"), 51.0):
        with pytest.raises(InvalidParameter, match="--log-logit-scale"):
            resolve_logit_scale(None, bad)
    assert log_like_warning(100.0) is None and log_like_warning(7.5) is None and log_like_warning(None) is None
    w = log_like_warning(4.6)
    assert "--log-logit-scale 4.6" in w and "99.48" in w


def score_json(idx, *args):
    r = CliRunner().invoke(cli.cli, ["score", str(idx), "--side", "text", "--metrics", "kl", "--estimator",
                                     "exact", "--json", "-q", *args])
    return r


def test_score_warns_on_a_log_like_scale_and_takes_the_log_form(small):
    idx, image, text = small
    r = score_json(idx, "--logit-scale", "4.6")
    assert r.exit_code == 0, r.output
    assert "looks like the log form" in r.stderr and "--log-logit-scale 4.6" in r.stderr
    assert json.loads(r.stdout)["logit_scale"] == pytest.approx(4.6)  # still used as given
    r = score_json(idx, "--log-logit-scale", "4.6052")
    assert r.exit_code == 0, r.output
    assert "Warning" not in r.stderr
    rep = json.loads(r.stdout)
    a = math.exp(4.6052)
    assert rep["logit_scale"] == pytest.approx(a)
    from clip_density_index.queries.sqlrun import run_sql

    got = run_sql(idx, "SELECT kl_text FROM scores ORDER BY vec_id").column("kl_text").to_numpy()
    want, _ = kl_both(unit(text), unit(image), a)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    r = score_json(idx, "--logit-scale", "100", "--log-logit-scale", "4.6")
    assert r.exit_code == 1 and "not both" in r.output


def test_build_index_warns_too(tmp_path):
    r = CliRunner().invoke(cli.cli, ["build-index", "--n", "50", "--log-logit-scale", "4.6", "--out",
                                     str(tmp_path / "x")])
    assert r.exit_code == 2 and "--log-logit-scale applies only to --source" in r.output

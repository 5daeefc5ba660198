"""KL-guided selection and the DataComp subset writer (queries/selection.py, `select`)."""

import math
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from clip_density_index import cli
from clip_density_index import queries
from clip_density_index.indexer.errors import BadInput, InvalidParameter
from clip_density_index.queries.selection import datacomp_subset, kept_count, select
from arrays_pool import N, fingerprint


def expected_uids(cols, uids, by, fraction, mask=None, lowest=False):
    """The selection rule, independently: filter, drop NaN, floor(F * m) (>= 1), best first, ties by uid."""
    x = np.asarray(cols[by], dtype=np.float64)
    keep = np.ones(len(x), bool) if mask is None else np.asarray(mask)
    keep &= ~np.isnan(x)
    idx = np.flatnonzero(keep)
    k = max(1, math.floor(round(fraction * len(idx), 9))) if len(idx) else 0
    key = x[idx] if lowest else -x[idx]
    order = sorted(range(len(idx)), key=lambda j: (key[j], uids[idx[j]]))
    return [uids[idx[j]] for j in order[:k]]


def as_hex(arr):
    return [f"{int(a):016x}{int(b):016x}" for a, b in arr]


def test_kept_count_rule():
    assert kept_count(0.25, 10) == 2  # floor(2.5)
    assert kept_count(0.29, 100) == 29  # 0.29 * 100 is 28.999999999999996 in binary floats
    assert kept_count(0.001, 10) == 1  # at least one when there is any candidate
    assert kept_count(1.0, 7) == 7
    assert kept_count(0.5, 0) == 0


def test_top_fraction_exact_uids_npy(arrays_index, tmp_path):
    idx, _, _, _, uids, cols = arrays_index
    out = tmp_path / "sub" / "dir" / "subset.npy"  # parent folders are created
    sel = select(idx, "kl_text", 0.25, out=out)
    want = expected_uids(cols, uids, "kl_text", 0.25)
    assert sel.kept == len(want) == N // 4 and sel.total == sel.passed_where == sel.candidates == N
    assert sel.uids == want
    assert sel.threshold == pytest.approx(np.sort(cols["kl_text"])[::-1][N // 4 - 1])
    arr = np.load(out)
    assert arr.dtype == np.dtype("u8,u8") and arr.shape == (N // 4,)
    assert as_hex(arr) == sorted(want)  # exactly the expected uids, sorted lexicographically
    assert arr.tolist() == sorted(arr.tolist())
    assert [(int(u[:16], 16), int(u[16:32], 16)) for u in sorted(want)] == arr.tolist()


def test_where_applies_first(arrays_index, tmp_path):
    idx, _, _, caps, uids, cols = arrays_index
    median = float(np.median(cols["clipscore"]))
    sel = select(idx, "klr_text", 0.3, where=f"clipscore > {median!r} AND caption NOT LIKE '%!'")
    mask = (cols["clipscore"] > median) & np.array([not c.endswith("!") for c in caps])
    want = expected_uids(cols, uids, "klr_text", 0.3, mask)
    assert sel.passed_where == int(mask.sum()) and sel.kept == math.floor(0.3 * mask.sum())
    assert sel.uids == want
    out = tmp_path / "w.txt"
    select(idx, "klr_text", 0.3, where=f"clipscore > {median!r} AND caption NOT LIKE '%!'", out=out)
    assert out.read_text().splitlines() == sorted(want)


def test_lowest_and_nulls_and_parquet(arrays_index, tmp_path):
    idx, _, _, _, uids, cols = arrays_index
    partial = np.arange(N, dtype=float)
    partial[np.arange(N) % 5 == 0] = np.nan  # as written by arrays_pool.write_scores (NULL)
    out = tmp_path / "p.parquet"
    sel = select(idx, "partial_score", 0.1, lowest=True, out=out)
    want = expected_uids({"partial_score": partial}, uids, "partial_score", 0.1, lowest=True)
    assert sel.candidates == N - N // 5 and sel.passed_where == N and sel.uids == want
    t = pq.read_table(out)
    assert t.column_names == ["rank", "uid", "vec_id", "partial_score"]
    assert t.column("uid").to_pylist() == want and t.column("rank").to_pylist() == list(range(1, len(want) + 1))


def test_where_matching_nothing_and_tiny_fraction(arrays_index, tmp_path):
    idx, _, _, _, uids, cols = arrays_index
    sel = select(idx, "kl_text", 0.5, where="clipscore > 100")
    assert sel.passed_where == 0 and sel.kept == 0 and sel.uids == [] and sel.threshold is None
    out = tmp_path / "empty.npy"  # an empty subset file is an error, not a silent success
    with pytest.raises(InvalidParameter, match=r"no sample passed --where 'clipscore > 100' \(0 of 400 passed\)"):
        select(idx, "kl_text", 0.5, where="clipscore > 100", out=out)
    assert not out.exists()
    sel = select(idx, "kl_text", 1e-6)
    assert sel.kept == 1 and sel.uids == [uids[int(np.argmax(cols["kl_text"]))]]


def test_select_cli(arrays_index, tmp_path):
    idx, _, _, _, uids, cols = arrays_index
    out = tmp_path / "subset.npy"
    runner = CliRunner()
    args = ["select", str(idx), "--by", "kl_text", "--top-fraction", "0.25", "--where", "clipscore > 0.5",
            "--out", str(out)]
    r = runner.invoke(cli.cli, args)
    assert r.exit_code == 0, r.output
    mask = cols["clipscore"] > 0.5
    want = expected_uids(cols, uids, "kl_text", 0.25, mask)
    assert f"{int(mask.sum()):,} of {N:,} samples passed --where" in r.output
    assert f"Kept {len(want):,} of {int(mask.sum()):,} samples" in r.output
    assert "DataComp subset format" in r.output
    assert as_hex(np.load(out)) == sorted(want)
    r = runner.invoke(cli.cli, args)
    assert r.exit_code == 1 and "already exists" in r.output and "--force" in r.output
    r = runner.invoke(cli.cli, args[:-4] + ["--out", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert len(np.load(out)) == N // 4


def test_api_reexport(arrays_index):
    idx, *_ = arrays_index
    assert queries.select(idx, by="kl_text", top_fraction=0.5).kept == N // 2


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan")])
def test_bad_fraction(arrays_index, fraction):
    idx, *_ = arrays_index
    with pytest.raises(InvalidParameter, match=r"\(0, 1\]"):
        select(idx, "kl_text", fraction)


def test_bad_inputs_fail_clearly_and_leave_the_catalog_unchanged(arrays_index, tmp_path):
    idx, *_ = arrays_index
    before = fingerprint(idx)
    with pytest.raises(InvalidParameter, match=r"Unknown score column 'kl_text; DROP TABLE scores'.*klr_text"):
        select(idx, "kl_text; DROP TABLE scores", 0.25)
    with pytest.raises(InvalidParameter, match="contains ';'"):
        select(idx, "kl_text", 0.25, where="1=1; DROP TABLE samples")
    with pytest.raises(InvalidParameter, match="not a single SQL condition"):
        select(idx, "kl_text", 0.25, where="1=1) UNION (SELECT 1")
    with pytest.raises(InvalidParameter, match="not a single SQL condition"):
        select(idx, "kl_text", 0.25, where="clipscore > 0, kl_text > 0")
    with pytest.raises(InvalidParameter, match="nosuchcolumn"):
        select(idx, "kl_text", 0.25, where="nosuchcolumn > 1")
    with pytest.raises(InvalidParameter, match="empty"):
        select(idx, "kl_text", 0.25, where="  ")
    with pytest.raises(InvalidParameter, match="unknown suffix"):
        select(idx, "kl_text", 0.25, out=tmp_path / "x.csv")
    runner = CliRunner()
    r = runner.invoke(cli.cli, ["select", str(idx), "--by", "kl_text", "--top-fraction", "0.1",
                                "--where", "1=1; DROP TABLE samples", "--out", str(tmp_path / "a.npy")])
    assert r.exit_code == 1 and "contains ';'" in r.output and not (tmp_path / "a.npy").exists()
    r = runner.invoke(cli.cli, ["select", str(idx), "--by", "nope", "--top-fraction", "0.1"])
    assert r.exit_code == 1 and "Unknown score column 'nope'" in r.output and "clipscore" in r.output
    r = runner.invoke(cli.cli, ["select", str(idx), "--by", "kl_text", "--top-fraction", "2"])
    assert r.exit_code == 1 and "(0, 1]" in r.output
    assert fingerprint(idx) == before


def test_datacomp_subset_format():
    uids = ["ffffffffffffffff0000000000000000", "0000000000000001ffffffffffffffff",
            "00000000000000010000000000000002"]
    arr = datacomp_subset(uids)
    assert arr.dtype == np.dtype("u8,u8")
    assert arr.tolist() == [(1, 2), (1, 2**64 - 1), (2**64 - 1, 0)]
    with pytest.raises(BadInput, match="'xyz' is not 32 hex digits"):
        datacomp_subset(["xyz"])


def test_where_is_evaluated_once_so_the_counts_agree(arrays_index):
    """``--where "random() < 0.5"`` ran three times (passed, candidates, the ranked rows): the CLI
    printed "2,457 passed", "-37 samples have no kl_text value", "Kept 1,247 of 2,494"."""
    idx, *_ = arrays_index
    for fraction in (1.0, 0.5, 1.0, 0.5, 1.0):
        # partial_score is NULL in every fifth row: passed - candidates counts exactly those rows
        sel = select(idx, "partial_score", fraction, where="random() < 0.5")
        vec_ids = sel.table.column("vec_id").to_pylist()
        assert 0 < sel.candidates <= sel.passed_where < N
        assert sel.kept == kept_count(fraction, sel.candidates) == sel.table.num_rows
        assert all(v % 5 for v in vec_ids) and len(set(vec_ids)) == len(vec_ids)
        # fraction 1 keeps every candidate: the rows ranked are the rows counted
        if fraction == 1.0:
            assert sel.kept == sel.candidates
    r = CliRunner().invoke(cli.cli, ["select", str(idx), "--by", "kl_text", "--top-fraction", "1",
                                     "--where", "random() < 0.5"])
    assert r.exit_code == 0, r.output
    passed = int(re.search(r"^([\d,]+) of 400 samples passed", r.output, re.M).group(1).replace(",", ""))
    kept, of = (int(x.replace(",", "")) for x in re.search(r"Kept ([\d,]+) of ([\d,]+)", r.output).groups())
    assert kept == of == passed and "have no" not in r.output, r.output  # kl_text has no NULL

"""DataComp-style selection (queries/keep.py, `select --keep`): pool-level fractions, intersections,
"filter, then rank", the paper's count; checked against an independent pandas computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner

pd = pytest.importorskip("pandas")

from clip_density_index import cli  # noqa: E402
from conftest import clustered_pairs  # noqa: E402
from clip_density_index.indexer.build import build_index  # noqa: E402
from clip_density_index.indexer.errors import InvalidParameter  # noqa: E402
from clip_density_index.indexer.sources import ArraySource  # noqa: E402
from clip_density_index.queries.keep import Keep, parse_keep, select_keep  # noqa: E402
from clip_density_index.queries.selection import select  # noqa: E402
from arrays_pool import write_scores  # noqa: E402

N = 500


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """(index dir, pandas frame of uid + every column) of a 500-sample index with a DataComp-like
    CLIP-score metadata column (NaN in a few rows, ties) and random score columns (ties too)."""
    root = tmp_path_factory.mktemp("keep")
    rng = np.random.default_rng(11)
    image, text = clustered_pairs(N, 8, seed=2)
    clip = np.round(rng.random(N), 2)  # two decimals: many ties, broken by uid
    clip[rng.choice(N, 7, replace=False)] = np.nan
    src = ArraySource(image, text, meta={"clip_l14_similarity_score": clip,
                                         "url": [f"http://example.com/{i}.jpg" for i in range(N)]})
    build_index(src, root / "idx")
    cols = {"kl_text": np.round(rng.normal(6, 1, N), 1), "klr_text": rng.normal(3, 1, N),
            "clipscore": rng.random(N) * 0.9, "dc_text": rng.random(N)}
    write_scores(root / "idx", cols)  # adds partial_score: NULL in every fifth row
    uids = src.meta.column("uid").to_pylist()
    partial = np.arange(N, dtype=np.float64)
    partial[np.arange(N) % 5 == 0] = np.nan
    df = pd.DataFrame({"uid": uids, "clip_l14_similarity_score": clip, **cols, "partial_score": partial})
    return root / "idx", df


def pd_count(fraction, n, paper=False):
    if n == 0:
        return 0
    k = max(1, math.floor(round(fraction * n, 9)))
    return min(n, k + 1) if paper else k


def pd_top(d, col, fraction, lowest=False, paper=False, of_valued=False):
    """uids of the best pd_count(F, rows) rows of frame d by col (NaN never kept; ties by uid); rows
    = every row of d (pool mode) or those with a value (of_valued: filtered mode, like select)."""
    valued = d[d[col].notna()]
    k = pd_count(fraction, len(valued) if of_valued else len(d), paper)
    ranked = valued.sort_values([col, "uid"], ascending=[lowest, True])
    return list(ranked["uid"].head(k))


def pd_pool(df, keeps, mask=None, paper=False):
    sets = [set(pd_top(df, c, f, lo, paper)) for c, f, lo in keeps]
    if mask is not None:
        sets.append(set(df.loc[mask, "uid"]))
    return set.intersection(*sets)


def pd_filtered(df, keeps, mask=None, paper=False):
    d = df if mask is None else df[mask]
    for c, f, lo in keeps:
        d = d[d["uid"].isin(pd_top(d, c, f, lo, paper, of_valued=True))]
    return set(d["uid"])


def test_parse_keep():
    assert parse_keep("kl_text:0.25") == Keep("kl_text", 0.25)
    assert parse_keep(" dc_text : 0.5 : LOWEST ") == Keep("dc_text", 0.5, True)
    for bad in ("kl_text", "kl_text:abc", "kl_text:0", "kl_text:1.5", "kl_text:0.2:middle"):
        with pytest.raises(InvalidParameter, match="--keep"):
            parse_keep(bad)


@pytest.mark.parametrize("keeps", [
    [("clip_l14_similarity_score", 0.3, False)],
    [("clip_l14_similarity_score", 0.3, False), ("kl_text", 0.25, False)],
    [("kl_text", 0.5, False), ("clipscore", 0.4, False), ("dc_text", 0.7, True)],
    [("partial_score", 0.9, False), ("klr_text", 0.6, False)],
])
@pytest.mark.parametrize("paper", [False, True])
def test_pool_mode_is_the_intersection_of_pool_fractions(pool, keeps, paper):
    idx, df = pool
    ks = select_keep(idx, [Keep(*k) for k in keeps], count="paper" if paper else "floor")
    want = pd_pool(df, keeps, paper=paper)
    assert set(ks.uids) == want and ks.kept == len(want)
    assert [s.of for s in ks.steps] == [N] * len(keeps)
    assert [s.kept for s in ks.steps] == [len(pd_top(df, c, f, lo, paper)) for c, f, lo in keeps]
    # rows come in rank order of the first keep, ties by uid
    first, _, lo = keeps[0]
    expect_order = df[df["uid"].isin(want)].sort_values([first, "uid"], ascending=[lo, True])["uid"].tolist()
    assert ks.uids == expect_order
    assert ks.table.column("rank").to_pylist() == list(range(1, ks.kept + 1))
    # the order of the keeps does not change the set
    assert set(select_keep(idx, [Keep(*k) for k in reversed(keeps)], count=ks.count).uids) == want


@pytest.mark.parametrize("keeps,where,mask", [
    ([("clipscore", 0.3, False), ("kl_text", 0.25, False)], None, None),
    ([("kl_text", 0.25, False)], "clipscore > 0.5", lambda d: d["clipscore"] > 0.5),
    ([("partial_score", 0.5, False), ("kl_text", 0.5, True)], "clipscore > 0.2", lambda d: d["clipscore"] > 0.2),
    ([("clip_l14_similarity_score", 0.5, False), ("klr_text", 0.3, False)],
     "url NOT LIKE '%7.jpg'", lambda d: ~d.index.map(lambda i: str(i).endswith("7")).to_numpy(bool)),
])
def test_filtered_mode_ranks_what_is_left(pool, keeps, where, mask):
    idx, df = pool
    m = None if mask is None else np.asarray(mask(df), bool)
    ks = select_keep(idx, [Keep(*k) for k in keeps], where=where, mode="filtered")
    assert set(ks.uids) == pd_filtered(df, keeps, m)
    if m is not None:
        assert ks.passed_where == int(m.sum())
        # pool mode with the same --where is a different, documented thing: an intersection
        assert set(select_keep(idx, [Keep(*k) for k in keeps], where=where).uids) == pd_pool(df, keeps, m)


def test_filtered_with_one_keep_equals_select(pool):
    idx, _ = pool
    for where in (None, "clipscore > 0.3"):
        for col in ("kl_text", "partial_score"):  # partial_score: NULL in every fifth row
            old = select(idx, col, 0.25, where=where)
            new = select_keep(idx, [f"{col}:0.25"], where=where, mode="filtered")
            assert new.uids == old.uids and new.kept == old.kept


def test_recipes_on_the_cli(pool, tmp_path):
    idx, df = pool
    runner = CliRunner()
    out = tmp_path / "both.npy"
    r = runner.invoke(cli.cli, ["select", str(idx), "--keep", "clip_l14_similarity_score:0.3",
                                "--keep", "kl_text:0.25", "--out", str(out)])
    assert r.exit_code == 0, r.output
    want = pd_pool(df, [("clip_l14_similarity_score", 0.3, False), ("kl_text", 0.25, False)])
    arr = np.load(out)
    assert sorted(f"{int(a):016x}{int(b):016x}" for a, b in arr) == sorted(want)
    assert f"Kept {len(want):,} of {N:,} samples" in r.output and "pool mode" in r.output
    # "CLIP-score threshold, then KL": the paper's future-work recipe
    r = runner.invoke(cli.cli, ["select", str(idx), "--where", "clipscore > 0.3", "--mode", "filtered",
                                "--keep", "kl_text:0.25", "--out", str(tmp_path / "then.txt")])
    assert r.exit_code == 0, r.output
    got = (tmp_path / "then.txt").read_text().split()
    assert set(got) == pd_filtered(df, [("kl_text", 0.25, False)], (df["clipscore"] > 0.3).to_numpy())
    # --count paper with --by: floor(F N) + 1
    r = runner.invoke(cli.cli, ["select", str(idx), "--by", "kl_text", "--top-fraction", "0.25", "--count", "paper"])
    assert r.exit_code == 0 and f"Kept {N // 4 + 1:,} of" in r.output, r.output
    # usage errors
    for args in (["--keep", "kl_text:0.2", "--by", "kl_text"], ["--by", "kl_text"], ["--mode", "pool", "--by",
                 "kl_text", "--top-fraction", "0.2"]):
        r = runner.invoke(cli.cli, ["select", str(idx), *args])
        assert r.exit_code == 2, (args, r.output)
    r = runner.invoke(cli.cli, ["select", str(idx), "--keep", "nope:0.2"])
    assert r.exit_code == 1 and "nope" in r.output and "clip_l14_similarity_score" in r.output
    r = runner.invoke(cli.cli, ["select", str(idx), "--keep", "caption:0.2"])  # not numeric
    assert r.exit_code == 1 and "caption" in r.output


@pytest.mark.parametrize("name,params", [("top_by_score", {}), ("bottom_by_score", {}),
                                         ("caption_search", {"text": "sample"})])
def test_ranked_queries_show_the_url_where_the_pool_has_one(pool, name, params):
    from clip_density_index.queries.sqlrun import run_query

    idx, df = pool
    t = run_query(idx, name, column="klr_text", limit=5, **params)
    assert t.column_names == ["rank", "vec_id", "uid", "caption", "url", "klr_text"]
    assert t.column("url").to_pylist() == [f"http://example.com/{i}.jpg" for i in t.column("vec_id").to_pylist()]
    asc = name == "bottom_by_score"
    assert t.column("uid").to_pylist() == df.sort_values(["klr_text", "uid"], ascending=[asc, True])["uid"].head(5).tolist()


def test_query_tables_have_a_title_and_files_do_not(pool, tmp_path):
    idx, df = pool
    runner = CliRunner()
    for name, word in (("top_by_score", "HIGHEST"), ("bottom_by_score", "LOWEST")):
        r = runner.invoke(cli.cli, ["query", str(idx), name, "--param", "column=kl_text", "--param", "limit=2"])
        assert r.exit_code == 0, r.output
        lines = r.stdout.splitlines()
        assert lines[0] == f"{name} (column=kl_text, limit=2): The samples with the {word} value of a score column"
        assert lines[1].split() == ["rank", "vec_id", "uid", "caption", "url", "kl_text"]
    r = runner.invoke(cli.cli, ["query", str(idx), "top_by_score", "--param", "limit=2", "--format", "csv"])
    assert r.exit_code == 0 and r.stdout.splitlines()[0].startswith("rank,vec_id,uid")

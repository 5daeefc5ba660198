"""Read-only SQL, named queries and output formats (queries/sqlrun.py, sql/*.sql, `sql` and `query`),
mostly on the arrays index (the ``arrays_index`` fixture of conftest.py; ``arrays_pool`` computes its
``scores`` table independently in numpy)."""

import json
import re
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scipy import stats

from clip_density_index import cli
from arrays_pool import N, fingerprint, write_scores
from conftest import clustered_pairs
from clip_density_index.indexer.build import build_index
from clip_density_index.indexer.errors import InvalidParameter, NotReadOnly, UnknownQuery
from clip_density_index.indexer.sources import ArraySource
from clip_density_index.queries import formats, sqlrun
from clip_density_index.queries.formats import render_table
from clip_density_index.queries.named import list_queries, parse_named_query
from clip_density_index.queries.sqlrun import (
    QueryError,
    check_read_only,
    run_query,
    run_sql,
)


# -- read-only checks ---------------------------------------------------------------------------
@pytest.mark.parametrize("sql", [
    "SELECT 1", "WITH a AS (SELECT 1 AS x) SELECT * FROM a", "DESCRIBE samples", "SHOW TABLES",
    "SUMMARIZE samples", "EXPLAIN SELECT 1", "FROM samples LIMIT 1", "VALUES (1)",
    "EXPLAIN ANALYZE SELECT 1", "explain (format json) select 1", "/* plan */ EXPLAIN ANALYZE FROM samples",
])
def test_read_only_statements_pass(sql):
    check_read_only(sql)


@pytest.mark.parametrize("sql,kind", [
    ("DELETE FROM samples", "DELETE"), ("CREATE TABLE x AS SELECT 1", "CREATE"),
    ("DROP TABLE scores", "DROP"), ("INSERT INTO samples SELECT * FROM samples", "INSERT"),
    ("UPDATE scores SET kl_text = 0", "UPDATE"), ("COPY samples TO 'x.csv'", "COPY"),
    ("ATTACH 'other.db'", "ATTACH"), ("PRAGMA show_tables", "PRAGMA"), ("SET threads = 1", "SET"),
    ("SELECT 1; DROP TABLE samples", "DROP"),
    ("WITH a AS (SELECT 1) INSERT INTO samples SELECT * FROM a", "INSERT"),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO 'x.csv'", "EXPLAIN COPY"),  # ANALYZE runs the COPY
    ("explain analyse (format json) copy samples to 'x.csv'", "EXPLAIN COPY"),
    ("EXPLAIN ANALYZE DELETE FROM samples", "EXPLAIN DELETE"),
])
def test_writing_statements_are_rejected_naming_the_kind(sql, kind):
    with pytest.raises(NotReadOnly, match=kind):
        check_read_only(sql)


def test_parse_errors_and_multiple_statements():
    with pytest.raises(QueryError, match="Cannot parse"):
        check_read_only("SELEC 1")
    with pytest.raises(QueryError, match="One statement"):
        check_read_only("SELECT 1; SELECT 2")


def test_run_sql_api(arrays_index):
    idx, *_ = arrays_index
    t = run_sql(idx, "SELECT count(*) AS n, count(DISTINCT uid) AS u FROM samples")
    assert t.to_pylist() == [{"n": N, "u": N}]
    t = run_sql(idx, "SELECT caption FROM samples WHERE vec_id = $v", {"v": 7})
    assert t.column("caption").to_pylist() == [arrays_index[3][7]]
    with pytest.raises(QueryError, match="nope"):
        run_sql(idx, "SELECT nope FROM samples")


@pytest.mark.parametrize("sql", [
    "DELETE FROM samples", "CREATE TABLE x AS SELECT 1", "SELECT 1; DROP TABLE samples",
    "DROP TABLE scores", "ATTACH ':memory:' AS m",
])
def test_sql_cli_refuses_writes_and_catalog_is_unchanged(arrays_index, sql):
    idx, *_ = arrays_index
    before = fingerprint(idx)
    result = CliRunner().invoke(cli.cli, ["sql", str(idx), sql])
    assert result.exit_code == 1
    assert "Not a read-only query" in result.output and "Traceback" not in result.output
    assert fingerprint(idx) == before


def test_explain_analyze_cannot_write_a_file(arrays_index, tmp_path):
    idx, *_ = arrays_index
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    sql = f"EXPLAIN ANALYZE COPY (SELECT uid FROM samples) TO '{victim}'"
    result = CliRunner().invoke(cli.cli, ["sql", str(idx), sql])
    assert result.exit_code == 1 and "EXPLAIN COPY statement" in result.output
    assert victim.read_text() == "original"


def test_repeated_column_names_are_kept_apart(arrays_index, tmp_path):
    """A join's two vec_id columns stay two (not the first, twice), and CSV keeps every value."""
    idx, *_ = arrays_index
    sql = "SELECT s.vec_id, w.vec_id FROM samples s JOIN samples w ON s.vec_id = w.vec_id + 1 ORDER BY 1 LIMIT 2"
    t = run_sql(idx, sql)
    assert t.column_names == ["vec_id", "vec_id_1"] and t.to_pylist() == [
        {"vec_id": 1, "vec_id_1": 0}, {"vec_id": 2, "vec_id_1": 1}]
    result = CliRunner().invoke(cli.cli, ["sql", str(idx), "SELECT 1 AS a, 2 AS a, 3 AS b", "--format", "csv"])
    assert result.exit_code == 0 and result.output.splitlines()[-2:] == ["a,a_1,b", "1,2,3"], result.output
    out = tmp_path / "r.parquet"
    result = CliRunner().invoke(cli.cli, ["sql", str(idx), sql, "--format", "parquet", "--out", str(out)])
    assert result.exit_code == 0 and pq.read_table(out).column("vec_id_1").to_pylist() == [0, 1]


def test_read_only_connection_is_the_real_guard(arrays_index, monkeypatch):
    idx, *_ = arrays_index
    before = fingerprint(idx)
    monkeypatch.setattr(sqlrun, "check_read_only", lambda sql: None)
    with pytest.raises(NotReadOnly, match="read-only"):
        run_sql(idx, "DELETE FROM samples")
    with pytest.raises(NotReadOnly, match="read-only"):
        run_sql(idx, "CREATE TABLE x AS SELECT 1")
    assert fingerprint(idx) == before


# -- output formats -----------------------------------------------------------------------------
def test_sql_cli_formats(arrays_index, tmp_path):
    idx, *_ = arrays_index
    runner = CliRunner()
    q = "SELECT vec_id, uid, caption FROM samples ORDER BY vec_id LIMIT 3"
    expected = run_sql(idx, q).to_pylist()

    r = runner.invoke(cli.cli, ["sql", str(idx), q])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["vec_id", "uid", "caption"] and set(lines[1]) <= {"-", " "}
    assert lines[-1] == "(3 rows)" and expected[2]["uid"] in r.output

    r = runner.invoke(cli.cli, ["sql", str(idx), q, "--format", "csv"])
    assert r.exit_code == 0 and r.output.splitlines()[0] == "vec_id,uid,caption"
    assert len(r.output.splitlines()) == 4

    r = runner.invoke(cli.cli, ["sql", str(idx), q, "--format", "jsonl"])
    assert r.exit_code == 0 and [json.loads(x) for x in r.output.splitlines()] == expected

    out = tmp_path / "deep" / "r.parquet"
    r = runner.invoke(cli.cli, ["sql", str(idx), q, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).to_pylist() == expected

    r = runner.invoke(cli.cli, ["sql", str(idx), q, "--out", str(out)])
    assert r.exit_code == 1 and "already exists" in r.output and "--force" in r.output
    r = runner.invoke(cli.cli, ["sql", str(idx), "SELECT 1 AS one", "--out", str(out), "--force"])
    assert r.exit_code == 0 and pq.read_table(out).to_pylist() == [{"one": 1}]

    r = runner.invoke(cli.cli, ["sql", str(idx), q, "--format", "parquet"])
    assert r.exit_code == 1 and "--out" in r.output

    out = tmp_path / "r.csv"
    r = runner.invoke(cli.cli, ["sql", str(idx), q, "--out", str(out)])
    assert r.exit_code == 0 and out.read_text().startswith("vec_id,uid,caption\n")


def test_render_table_truncates_and_formats():
    import pyarrow as pa

    t = pa.table({"x": [1.23456789, None], "s": ["a" * 100, "line\nbreak"], "l": [["aa", "bb"], []]})
    text = render_table(t, max_width=20)
    assert "1.23457" in text and "NULL" in text and "a" * 19 + "…" in text and "line break" in text
    assert "(2 rows)" in text
    assert "a" * 100 in render_table(t, max_width=0)


def test_jsonl_writes_nan_as_null():
    import pyarrow as pa

    assert json.loads(formats.to_jsonl(pa.table({"x": [float("nan")]}))) == {"x": None}


# -- named queries ------------------------------------------------------------------------------
def test_shipped_named_queries_parse_and_are_listed():
    names = {q.name for q in list_queries()}
    assert {"top_by_score", "bottom_by_score", "score_deciles", "score_correlations", "ngram_coverage",
            "weights_summary", "caption_search"} <= names
    assert "kl_per_sample" not in names  # internal SQL without a `-- name:` header
    for q in list_queries():
        assert q.description
        for p in q.params:
            assert p.description


def test_query_list_cli():
    r = CliRunner().invoke(cli.cli, ["query", "--list"])
    assert r.exit_code == 0, r.output
    assert "top_by_score" in r.output and "--param column (column, default kl_text)" in r.output
    assert "--param limit (int>=0, default 20)" in r.output


def test_named_query_header_is_checked():
    ok = "-- name: q\n-- description: d\n-- param: column (column, default kl_text): c\n" \
         "-- param: limit (int>=1, default 5): l\nSELECT {{column}} FROM scores LIMIT $limit"
    q = parse_named_query("q", ok)
    assert [p.name for p in q.params] == ["column", "limit"] and q.params[1].default == 5
    assert parse_named_query("x", "-- just a comment\nSELECT 1") is None
    with pytest.raises(QueryError, match="must match the file name"):
        parse_named_query("other", ok)
    with pytest.raises(QueryError, match=r"\$n"):
        parse_named_query("q", "-- name: q\nSELECT $n")
    with pytest.raises(QueryError, match="never uses"):
        parse_named_query("q", "-- name: q\n-- param: n (int, default 1)\nSELECT 1")
    with pytest.raises(QueryError, match="column parameter"):
        parse_named_query("q", "-- name: q\n-- param: n (int, default 1)\nSELECT {{n}}")
    with pytest.raises(QueryError, match="value parameter"):
        parse_named_query("q", "-- name: q\n-- param: c (column, default x)\nSELECT $c")
    with pytest.raises(QueryError, match="bad parameter"):
        parse_named_query("q", "-- name: q\n-- param: n (number)\nSELECT $n")
    # $ inside a string literal is not a parameter
    assert parse_named_query("q", "-- name: q\nSELECT regexp_matches('a', '$x')").params == ()


def test_top_and_bottom_by_score_match_numpy(arrays_index):
    idx, _, _, caps, uids, cols = arrays_index
    for name, col, sign in (("top_by_score", "klr_text", -1), ("bottom_by_score", "dw_image", 1)):
        t = run_query(idx, name, column=col, limit="7")
        order = np.argsort(sign * cols[col], kind="stable")[:7]
        assert t.column_names == ["rank", "vec_id", "uid", "caption", col]
        assert t.column("vec_id").to_pylist() == order.tolist()
        assert t.column("uid").to_pylist() == [uids[i] for i in order]
        assert t.column("caption").to_pylist() == [caps[i] for i in order]
        np.testing.assert_allclose(t.column(col).to_numpy(), cols[col][order])
        assert t.column("rank").to_pylist() == list(range(1, 8))
    assert run_query(idx, "top_by_score").num_rows == 20  # defaults: kl_text, 20


def test_top_by_score_cli(arrays_index):
    idx, _, _, _, uids, cols = arrays_index
    r = CliRunner().invoke(cli.cli, ["query", str(idx), "top_by_score", "--param", "column=clipscore",
                                     "--param", "limit=3", "--format", "jsonl"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in r.output.splitlines()]
    assert [x["uid"] for x in rows] == [uids[i] for i in np.argsort(-cols["clipscore"])[:3]]


def test_named_query_errors(arrays_index):
    idx, *_ = arrays_index
    before = fingerprint(idx)
    with pytest.raises(InvalidParameter, match=r"Unknown score column 'kl_text; DROP TABLE scores'.*kl_text"):
        run_query(idx, "top_by_score", column="kl_text; DROP TABLE scores")
    with pytest.raises(InvalidParameter, match="Unknown score column 'caption'"):
        run_query(idx, "top_by_score", column="caption")  # a column, but not a numeric score
    with pytest.raises(InvalidParameter, match="Unknown parameter 'colum'.*column, limit"):
        run_query(idx, "top_by_score", colum="kl_text")
    with pytest.raises(InvalidParameter, match="must be an integer, got 'ten'"):
        run_query(idx, "top_by_score", limit="ten")
    with pytest.raises(InvalidParameter, match=">= 0"):
        run_query(idx, "top_by_score", limit=-1)
    with pytest.raises(InvalidParameter, match="needs parameter 'text'"):
        run_query(idx, "caption_search")
    with pytest.raises(UnknownQuery, match="Unknown query 'nope'; available: .*top_by_score"):
        run_query(idx, "nope")
    runner = CliRunner()
    r = runner.invoke(cli.cli, ["query", str(idx), "top_by_score", "--param", "column=kl_text; DROP TABLE scores"])
    assert r.exit_code == 1 and "Unknown score column" in r.output and "valid columns" in r.output
    r = runner.invoke(cli.cli, ["query", str(idx), "top_by_score", "--param", "bogus=1"])
    assert r.exit_code == 1 and "Unknown parameter 'bogus'" in r.output
    r = runner.invoke(cli.cli, ["query", str(idx), "nope"])
    assert r.exit_code == 1 and "Unknown query 'nope'" in r.output and "score_deciles" in r.output
    r = runner.invoke(cli.cli, ["query", str(idx), "top_by_score", "--param", "limit"])
    assert r.exit_code == 2 and "KEY=VALUE" in r.output
    r = runner.invoke(cli.cli, ["query", str(idx)])
    assert r.exit_code == 2
    assert fingerprint(idx) == before


def test_text_parameters_are_bound_not_spliced(arrays_index):
    idx, _, _, caps, _, cols = arrays_index
    before = fingerprint(idx)
    assert run_query(idx, "caption_search", text="'; DROP TABLE samples; --").num_rows == 0
    t = run_query(idx, "caption_search", text="PIZZA", column="kl_text", limit=1000)
    expect = [i for i, c in enumerate(caps) if "pizza" in c.lower()]
    assert sorted(t.column("vec_id").to_pylist()) == expect
    assert t.column("kl_text").to_pylist() == sorted(cols["kl_text"][expect], reverse=True)
    assert fingerprint(idx) == before


def test_score_deciles_match_numpy(arrays_index):
    idx, _, _, caps, uids, cols = arrays_index
    t = run_query(idx, "score_deciles", column="kl_image")
    x = cols["kl_image"]
    order = np.lexsort((np.array(uids), x))
    parts = np.array_split(order, 10)  # ntile: equal sizes, the first buckets take the remainder
    assert t.column("bucket").to_pylist() == list(range(1, 11))
    assert t.column("n").to_pylist() == [len(p) for p in parts]
    np.testing.assert_allclose(t.column("min").to_numpy(), [x[p].min() for p in parts])
    np.testing.assert_allclose(t.column("max").to_numpy(), [x[p].max() for p in parts])
    np.testing.assert_allclose(t.column("mean").to_numpy(), [x[p].mean() for p in parts])
    for ex, p in zip(t.column("examples").to_pylist(), parts):
        assert len(ex) == 3 and set(ex) <= {caps[i] for i in p}
    t = run_query(idx, "score_deciles", column="kl_image", buckets=4, examples=1)
    assert t.num_rows == 4 and all(len(e) == 1 for e in t.column("examples").to_pylist())


def test_score_deciles_drop_null_scores(arrays_index):
    idx, *_ = arrays_index
    t = run_query(idx, "score_deciles", column="partial_score", buckets=2)
    assert sum(t.column("n").to_pylist()) == N - N // 5


def test_score_correlations_match_scipy(arrays_index):
    idx, *_, cols = arrays_index
    t = run_query(idx, "score_correlations").to_pylist()
    assert len(t) == 2 * 3 * 2  # side x measure x method
    seen = set()
    for row in t:
        seen.add((row["side"], row["measure"], row["method"]))
        for against in ("kl", "klr", "dc", "dw"):
            x, y = cols[f"{row['measure']}_{row['side']}"], cols[f"{against}_{row['side']}"]
            fn = stats.pearsonr if row["method"] == "pearson" else stats.spearmanr
            assert row[against] == pytest.approx(fn(x, y)[0], abs=1e-9)
        assert row["n"] == N
    assert seen == {(s, m, k) for s in ("image", "text") for m in ("conformity", "loglik", "rawnorm")
                    for k in ("pearson", "spearman")}
    conf_dc = [r["dc"] for r in t if r["measure"] == "conformity"]
    np.testing.assert_allclose(conf_dc, -1.0, atol=1e-9)  # SPEC 5: D_C is affine in conformity


def test_spearman_uses_average_ranks_for_ties(tmp_path):
    # a scores table whose columns have ties: SQL Spearman must equal scipy's (average ranks)
    image, text = clustered_pairs(60, 8, seed=1)
    out = tmp_path / "idx"
    build_index(ArraySource(image, text), out)
    r = np.random.default_rng(0)
    cols = {c: r.integers(0, 4, 60).astype(float) for c in (
        [f"{m}_{s}" for m in ("conformity", "loglik", "rawnorm", "kl", "klr", "dc", "dw") for s in ("image", "text")])}
    write_scores(out, cols)
    for row in run_query(out, "score_correlations").to_pylist():
        if row["method"] == "spearman":
            x = cols[f"{row['measure']}_{row['side']}"]
            assert row["kl"] == pytest.approx(stats.spearmanr(x, cols[f"kl_{row['side']}"])[0], abs=1e-9)


def test_ngram_coverage_matches_python(arrays_index):
    idx, _, _, caps, _, cols = arrays_index
    top = 15
    grams = {}
    for i, c in enumerate(caps):
        w = re.findall(r"[a-z0-9']+", c.lower())
        grams[i] = [" ".join(w[j:j + 3]) for j in range(len(w) - 2)]
    counts = Counter(g for gs in grams.values() for g in gs)
    frequent = {g for g, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]}
    x = cols["klr_text"]
    parts = np.array_split(np.lexsort((np.arange(N), x)), 10)
    t = run_query(idx, "ngram_coverage", column="klr_text", top=top)
    assert t.column("n").to_pylist() == [len(p) for p in parts]
    for row, p in zip(t.to_pylist(), parts):
        occ = [g for i in p for g in grams[i]]
        assert row["trigrams"] == len(occ)
        assert row["covered"] == sum(g in frequent for g in occ)
        assert row["coverage"] == pytest.approx(row["covered"] / len(occ))
        assert row["min"] == pytest.approx(x[p].min())


def test_missing_scores_table_says_what_to_run(tmp_path):
    image, text = clustered_pairs(50, 8, seed=2)
    out = tmp_path / "idx"
    build_index(ArraySource(image, text), out)
    with pytest.raises(InvalidParameter, match="no scores table yet.*cli.py score"):
        run_query(out, "top_by_score")
    with pytest.raises(QueryError, match="cli.py score"):
        run_query(out, "score_correlations")
    with pytest.raises(QueryError, match="cli.py weights"):
        run_query(out, "weights_summary")


def test_sql_files_are_named_queries_or_internal_statements_with_unique_names():
    from importlib.resources import files

    from clip_density_index.indexer.store import SQL_DIRS, load_sql

    root = files("clip_density_index.sql")
    names = {sub: {p.name[:-4] for p in (root.joinpath(sub) if sub else root).iterdir() if p.name.endswith(".sql")}
             for sub in SQL_DIRS}
    assert not names[""] & names["internal"], "a name in both sql/ and sql/internal/"
    for name in names[""]:  # user-facing: every file in sql/ is a named query with a header
        assert load_sql(name).startswith("-- name: "), f"sql/{name}.sql has no '-- name:' header"
    for name in names["internal"]:
        assert not load_sql(name).startswith("-- name: "), f"sql/internal/{name}.sql is a named query"

"""What user SQL can reach: the catalog's tables, and no file outside the index.

``sql``, ``query`` and ``select --where`` run on read-only catalog connections opened with DuckDB's
``enable_external_access`` off and the configuration locked (``indexer.store.READ_ONLY_CONFIG``).
Every test here plants a file outside the index holding a unique token and tries to read it (or
to write beside it); the statement must fail, the token must not appear in any message, and the
catalog must be unchanged.
"""

import os

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from clip_density_index import cli
from clip_density_index.indexer.errors import ClipIndexError, InvalidParameter
from clip_density_index.indexer.pool import open_index
from clip_density_index.queries import sqlrun
from clip_density_index.queries.selection import select
from clip_density_index.queries.named import parse_named_query
from clip_density_index.queries.sqlrun import QueryError, read_only_store, run_query, run_sql
from arrays_pool import fingerprint

TOKEN = "zq-secret-token-5d1e"


@pytest.fixture
def outside(tmp_path):
    """Files outside the index holding TOKEN: text, CSV, parquet and a DuckDB database."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_text(f"{TOKEN}\n")
    (d / "secret.csv").write_text(f"name\n{TOKEN}\n")
    pq.write_table(pa.table({"name": [TOKEN]}), d / "secret.parquet")
    con = duckdb.connect(str(d / "other.duckdb"))
    con.execute("CREATE TABLE secret AS SELECT $t AS name", {"t": TOKEN})
    con.close()
    return d


READS = [
    "SELECT content FROM read_text('{d}/secret.txt')",
    "SELECT content FROM read_blob('{d}/secret.txt')",
    "SELECT * FROM read_csv('{d}/secret.csv')",
    "SELECT * FROM read_csv_auto('{d}/*.csv')",
    "SELECT * FROM '{d}/secret.csv'",
    "SELECT * FROM read_parquet('{d}/secret.parquet')",
    "SELECT * FROM parquet_metadata('{d}/secret.parquet')",
    "SELECT * FROM read_json('{d}/secret.txt')",
    "SELECT * FROM glob('{d}/**')",
    "SELECT * FROM glob('/root/**')",
    "SELECT content FROM read_text('/etc/passwd')",
    "SELECT count(*) FROM samples WHERE caption = (SELECT content FROM read_text('{d}/secret.txt'))",
    "SELECT (SELECT content FROM read_text('{d}/secret.txt'))::INTEGER",  # the value in a cast error
]


@pytest.mark.parametrize("sql", READS)
def test_sql_cannot_read_files_outside_the_index(arrays_index, outside, sql):
    idx, *_ = arrays_index
    q = sql.format(d=outside)
    with pytest.raises(QueryError, match="disabled by configuration") as e:
        run_sql(idx, q)
    assert TOKEN not in str(e.value)
    r = CliRunner().invoke(cli.cli, ["sql", str(idx), q])
    assert r.exit_code == 1 and "Traceback" not in r.output and TOKEN not in r.output, r.output
    assert "outside the index" in r.output


@pytest.mark.parametrize("sql", [
    "ATTACH '{d}/other.duckdb' AS o",
    "COPY (SELECT uid FROM samples) TO '{d}/copied.csv'",
    "EXPORT DATABASE '{d}/export'",
    "INSTALL json",
    "LOAD '{d}/secret.txt'",
    "CREATE SECRET s (TYPE s3, KEY_ID 'x', SECRET 'y')",
])
def test_the_connection_refuses_what_the_statement_check_also_refuses(arrays_index, outside, monkeypatch, sql):
    """The statement-kind check rejects these first; the connection itself must refuse them too."""
    idx, *_ = arrays_index
    before = fingerprint(idx)
    monkeypatch.setattr(sqlrun, "check_read_only", lambda sql: None)
    with pytest.raises(ClipIndexError) as e:
        run_sql(idx, sql.format(d=outside))
    assert TOKEN not in str(e.value)
    assert sorted(p.name for p in outside.iterdir()) == ["other.duckdb", "secret.csv", "secret.parquet", "secret.txt"]
    assert fingerprint(idx) == before


def test_the_setting_is_locked(arrays_index, outside, monkeypatch):
    idx, *_ = arrays_index
    monkeypatch.setattr(sqlrun, "check_read_only", lambda sql: None)
    for sql in ("SET enable_external_access = true", "SET lock_configuration = false",
                "RESET enable_external_access", "SET GLOBAL enable_external_access = true"):
        with pytest.raises(QueryError):
            run_sql(idx, sql)
    with read_only_store(idx) as store:  # one connection: a SET that failed left nothing behind
        for sql in ("SET enable_external_access = true", "SET lock_configuration = false"):
            with pytest.raises(duckdb.Error, match="locked"):
                store.con.execute(sql)
        assert store.con.execute("SELECT current_setting('enable_external_access'), "
                                 "current_setting('lock_configuration')").fetchall() == [(False, True)]
        with pytest.raises(duckdb.Error, match="disabled by configuration"):
            store.con.execute(f"SELECT * FROM read_text('{outside}/secret.txt')")


def test_select_where_cannot_read_files_and_does_not_leak_them(arrays_index, outside, tmp_path):
    idx, *_ = arrays_index
    for where in (f"(SELECT content FROM read_text('{outside}/secret.txt'))::INTEGER > 0",
                  f"caption IN (SELECT name FROM read_csv('{outside}/secret.csv'))",
                  f"(SELECT count(*) FROM glob('{outside}/*')) > 0"):
        with pytest.raises(InvalidParameter, match="disabled by configuration") as e:
            select(idx, "kl_text", 0.5, where=where)
        assert TOKEN not in str(e.value)
        out = tmp_path / "s.npy"
        r = CliRunner().invoke(cli.cli, ["select", str(idx), "--by", "kl_text", "--top-fraction", "0.5",
                                         "--where", where, "--out", str(out)])
        assert r.exit_code == 1 and TOKEN not in r.output and "Traceback" not in r.output, r.output
        assert not out.exists()


def test_named_queries_run_on_the_same_guarded_connection(arrays_index, outside, monkeypatch):
    """Named queries take only bound values, but a query file itself cannot reach files either."""
    idx, *_ = arrays_index
    text = ("-- name: leak\n-- description: reads a file\n"
            f"SELECT content FROM read_text('{outside}/secret.txt')\n")
    monkeypatch.setattr(sqlrun, "get_query", lambda name: parse_named_query("leak", text))
    with pytest.raises(QueryError, match="disabled by configuration") as e:
        run_query(idx, "leak")
    assert TOKEN not in str(e.value)


def test_the_catalog_still_opens_and_a_kept_reader_shares_the_configuration(arrays_index):
    idx, *_ = arrays_index
    pool = open_index(idx)
    try:
        kept = pool.reader()  # sample keeps this one open; user SQL in the same process opens another
        assert run_sql(pool, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 400}]
        assert kept.con.execute("SELECT current_setting('enable_external_access')").fetchall() == [(False,)]
        assert run_query(pool, "top_by_score", column="kl_text", limit=2).num_rows == 2
    finally:
        pool.close()


@pytest.mark.parametrize("command,name", [
    (["sql", "{idx}", "SELECT 1 AS x"], "catalog.duckdb"),
    (["sql", "{idx}", "SELECT 1 AS x", "--format", "csv"], "catalog.duckdb.wal"),
    (["query", "{idx}", "top_by_score", "--param", "limit=2"], "image_emb.npy"),
    (["select", "{idx}", "--by", "kl_text", "--top-fraction", "0.1"], "text_emb.npy"),
])
def test_an_out_file_never_replaces_a_file_of_an_index(arrays_index, tmp_path, command, name):
    """``sql --out idx/catalog.duckdb --force`` overwrote the index's own catalog."""
    idx, *_ = arrays_index
    before = fingerprint(idx)
    target = idx / name
    files = {p.name: p.read_bytes() for p in idx.iterdir() if p.is_file()}
    link = tmp_path / f"link{target.suffix}"
    link.symlink_to(target)
    for out in (target, link):
        args = [a.format(idx=idx) for a in command] + ["--out", str(out), "--force"]
        r = CliRunner().invoke(cli.cli, args)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert f"is a file of the index at '{idx}'" in r.output, r.output
    assert fingerprint(idx) == before
    assert {p.name: p.read_bytes() for p in idx.iterdir() if p.is_file()} == files


def test_temporaries_of_killed_out_writes_are_removed_and_live_ones_kept(arrays_index, tmp_path):
    """A killed ``--out`` write's hidden ``.NAME.tmp-PID`` file does not stay behind for good; a live
    writer's is kept."""
    import subprocess
    import sys

    idx, *_ = arrays_index
    out = tmp_path / "r.csv"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".r.csv.tmp-{dead.pid}"
    live = tmp_path / f".r.csv.tmp-{os.getppid()}"  # another live process's write in progress
    other = tmp_path / f".other.csv.tmp-{dead.pid}"  # a temporary of another output: not ours to judge
    for p in (stale, live, other):
        p.write_text("partial")
    r = CliRunner().invoke(cli.cli, ["sql", str(idx), "SELECT 1 AS x", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_text().splitlines()[-1].strip() == "1"
    assert not stale.exists() and live.exists() and other.exists()

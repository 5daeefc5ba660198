"""The temporary DuckDB macros that several statements share: ``kl_scores`` (sql/internal/kl_formula.sql,
the KL / KLR formula of SPEC 2 that kl_per_sample and kl_strata apply) and ``sample_cards``
(sql/internal/sample_cards.sql, the card columns of the named queries that list samples, created
through their ``-- uses:`` header)."""

import math

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from clip_density_index.indexer.errors import InvalidParameter, QueryError
from clip_density_index.indexer.store import CatalogConnection, Store
from clip_density_index.queries.kl_sql import run_kl_statement
from clip_density_index.queries.named import get_query, parse_named_query
from clip_density_index.queries.sqlrun import run_named


def kl_scores(con, log_z, e_s, mean_s, n, bias):
    return con.execute("SELECT unnest(kl_scores($log_z, $e_s, $mean_s, $n, $bias::DOUBLE))",
                       {"log_z": log_z, "e_s": e_s, "mean_s": mean_s, "n": n, "bias": bias}).fetchall()[0]


def test_kl_formula_is_spec_2_for_clip_and_siglip():
    con = duckdb.connect()
    CatalogConnection(con, ":memory:", read_only=False).run("kl_formula")
    log_z, e_s, mean_s, n = 7.25, 3.5, -0.75, 1000
    kl, klr = kl_scores(con, log_z, e_s, mean_s, n, None)
    assert kl == pytest.approx(e_s - log_z + math.log(n)) and klr == pytest.approx(log_z - math.log(n) - mean_s)
    kl, klr = kl_scores(con, log_z, e_s, mean_s, n, -10.0)
    assert kl == pytest.approx(e_s + math.log(n - 1) - 10.0) and klr == pytest.approx(-math.log(n - 1) + 10.0 - mean_s)
    assert kl_scores(con, None, None, mean_s, n, None) == (None, None)


def test_kl_statement_creates_the_macro_on_a_fresh_connection_and_checks_siglip_n():
    partials = pa.table({"query": np.array([1, 0], np.int64), "shift": [0.0, 0.0], "scanned_sum": [2.0, 1.0],
                         "scanned_sum_s": [1.0, 0.5], "scanned_n": [3, 3], "model_sum": [0.0, 1.0],
                         "model_sum_s": [0.0, 0.5], "mean_s": [0.1, 0.2]})
    with duckdb.connect() as con:
        out = run_kl_statement(con, "kl_strata", {"partials": partials}, 3)
    assert out.column_names == ["query", "kl", "klr", "model_share"]
    assert out.column("query").to_pylist() == [0, 1]
    # query 0: Z' = 2, E = 1 / 2 -> D_KL = 0.5 - ln 2 + ln 3, D_KLR = ln 2 - ln 3 - 0.2, model share 1/2
    assert out.column("kl").to_pylist()[0] == pytest.approx(0.5 - math.log(2) + math.log(3))
    assert out.column("klr").to_pylist()[0] == pytest.approx(math.log(2) - math.log(3) - 0.2)
    assert out.column("model_share").to_pylist() == pytest.approx([0.5, 0.0])
    with duckdb.connect() as con, pytest.raises(InvalidParameter, match="at least 2 candidates"):
        run_kl_statement(con, "kl_strata", {"partials": partials}, 1, b=-10.0)


def test_uses_header_names_an_internal_statement():
    q = parse_named_query("q", "-- name: q\n-- uses: sample_cards\nSELECT 1")
    assert q.uses == ("sample_cards",)
    assert get_query("top_by_score").uses == ("sample_cards",)
    for bad in ("nope", "top_by_score", "migrations/001_create_tables"):
        with pytest.raises(QueryError, match="not a statement of sql/internal/"):
            parse_named_query("q", f"-- name: q\n-- uses: {bad}\nSELECT 1")


def test_sample_cards_take_the_score_from_scores_even_when_samples_has_a_column_of_its_name():
    with Store(":memory:") as store:
        store.con.execute("CREATE TABLE samples AS SELECT range AS vec_id, 'u' || range AS uid, 'c' || range AS caption, "
                    "-range::DOUBLE AS kl_text FROM range(5)")
        store.con.execute("CREATE TABLE scores AS SELECT range AS vec_id, (range % 3)::DOUBLE AS kl_text FROM range(5)")
        top = run_named(store, get_query("top_by_score"), {"column": "kl_text", "limit": 3})
        bottom = run_named(store, get_query("bottom_by_score"), {"column": "kl_text", "limit": 2})
    assert top.column_names == ["rank", "vec_id", "uid", "caption", "kl_text"]
    assert top.to_pylist() == [  # scores 2, 1, 1: ties broken by uid
        {"rank": 1, "vec_id": 2, "uid": "u2", "caption": "c2", "kl_text": 2.0},
        {"rank": 2, "vec_id": 1, "uid": "u1", "caption": "c1", "kl_text": 1.0},
        {"rank": 3, "vec_id": 4, "uid": "u4", "caption": "c4", "kl_text": 1.0},
    ]
    assert bottom.column("vec_id").to_pylist() == [0, 3]

"""Running SQL over an index catalog: user statements, and named queries with their parameters.

Two entry points, both on a catalog connection opened read-only and sandboxed
(``indexer.store.READ_ONLY_CONFIG``):

* ``run_sql(index, sql)``: one user-written statement, checked up front (``queries.readonly``)
  and run where DuckDB refuses to write or reach a file (the real guard).
* ``run_query(index, name, **params)``: a *named query*, a ``sql/<name>.sql`` file whose header
  declares its parameters (``queries.named``). Values are bound; a column parameter is checked
  against the numeric columns of ``scores`` (``queries.identifiers``) and only then filled in as
  a quoted identifier (``bind_query``); the macros it reads (its ``-- uses:`` header) are created on
  the connection first (``run_named``).

Results are ``pyarrow.Table``; ``queries.formats`` prints or saves them. Failures are one line
naming the statement (``QueryError``, ``NotReadOnly``), with a hint when a table the statement
needs has not been computed yet.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa

from clip_density_index.indexer.errors import InvalidParameter, QueryError
from clip_density_index.indexer.pool import as_pool
from clip_density_index.indexer.store import CatalogConnection, Store, fill_identifiers
from clip_density_index.queries.identifiers import check_score_column
from clip_density_index.queries.named import NamedQuery, get_query, strip_strings
from clip_density_index.queries.readonly import check_read_only, snippet

#: DuckDB's words when a read-only connection (``indexer.store.READ_ONLY_CONFIG``) refuses a file.
OUTSIDE_REFUSED = "disabled by configuration"
OUTSIDE_HINT = (" (SQL here reaches the index's catalog tables only: files outside the index cannot be "
                "read, written, attached or loaded)")


def read_only_store(index) -> Store:
    """A ``Store`` over the catalog of ``index`` (path or ``PoolIndex``) opened read-only."""
    return as_pool(index).store(read_only=True)


def _hint(store: CatalogConnection, msg: str) -> str:
    """What to do about a failed user statement: it reached for a file, or a table not made yet."""
    if OUTSIDE_REFUSED in msg:
        return OUTSIDE_HINT
    if "scores" in msg and not store.has_table("scores"):
        return " (this index has no scores table yet: run `python cli.py score INDEX_DIR` first)"
    if "weights" in msg and not store.has_table("weights"):
        return " (this index has no weights table yet: run `python cli.py weights INDEX_DIR --prompt TEXT` first)"
    return ""


def query_errors(store: CatalogConnection, subject: str):
    """A block whose DuckDB errors become ``QueryError("<subject> failed: ...")`` with a hint, or
    ``NotReadOnly`` for a write (see ``indexer.store.CatalogConnection.errors``)."""
    return store.errors(subject, QueryError, lambda msg: _hint(store, msg))


def run_sql(index, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
    """Run one read-only SQL statement over the catalog of ``index``.

    Args:
        index: index directory (str / Path) or an opened ``PoolIndex``.
        sql: the statement; tables ``samples``, ``scores``, ``weights``, ``manifest``, ... (SPEC 11).
        params: values for ``$name`` parameters in ``sql``.

    Returns:
        The result as a ``pyarrow.Table``.

    Raises:
        IndexNotFound: no index at ``index``.
        NotReadOnly: the statement would modify the catalog.
        QueryError: the statement does not parse or fails.
    """
    check_read_only(sql)
    with read_only_store(index) as store, query_errors(store, f"SQL {snippet(sql)!r}"):
        return store.arrow_text(sql, params)


def bind_query(query: NamedQuery, store: CatalogConnection, params: dict[str, Any]) -> tuple[str, dict]:
    """The SQL text and ``$`` bindings for running ``query`` with user ``params``.

    Column parameters are validated against the allowlist (``queries.identifiers``) and only then
    filled in, quoted, for their ``{{name}}`` placeholders; every other parameter is bound.

    Raises:
        InvalidParameter: an unknown parameter, a missing required one, a bad value or an unknown
            score column.
    """
    for key in params:
        query.param(key)  # raises for unknown names
    columns: dict[str, str] = {}
    bindings: dict[str, Any] = {}
    body = strip_strings(query.sql)
    for p in query.params:
        if p.name in params:
            value = p.convert(params[p.name], query.name)
        elif p.required:
            raise InvalidParameter(
                f"Query {query.name!r} needs parameter {p.name!r} ({p.describe()}); pass --param {p.name}=VALUE"
            )
        else:
            value = p.default
        if p.kind == "column":
            if value is None:
                raise InvalidParameter(f"Parameter {p.name!r} of query {query.name!r} needs a column name")
            columns[p.name] = check_score_column(store, value, f"parameter {p.name!r} of query {query.name!r}")
        elif re.search(r"\$" + p.name + r"\b", body):
            bindings[p.name] = value
    return fill_identifiers(query.sql, columns, f"Query {query.name!r}"), bindings


def run_named(store: CatalogConnection, query: NamedQuery, params: dict[str, Any]) -> pa.Table:
    """Run ``query`` with user ``params`` on an open read-only catalog connection: bound
    (``bind_query``), checked read-only, after the statements of its ``-- uses:`` header have
    created the macros it reads on this connection (temporary: they live as long as it does)."""
    sql, bindings = bind_query(query, store, params)
    check_read_only(sql)
    for statement in query.uses:
        store.run(statement)
    return store.arrow_text(sql, bindings)


def run_query(index, name: str, **params: Any) -> pa.Table:
    """Run the named query ``name`` over the catalog of ``index`` (read-only).

    Args:
        index: index directory (str / Path) or an opened ``PoolIndex``.
        name: a named query (see ``queries.named.list_queries``).
        **params: parameter values (strings are converted to the declared types).

    Returns:
        The result as a ``pyarrow.Table``.

    Raises:
        UnknownQuery: no such named query.
        InvalidParameter: unknown parameter, bad value, or a column not in the ``scores`` table.
        QueryError: the query fails on this index (e.g. a table it needs is missing).
    """
    query = get_query(name)
    with read_only_store(index) as store, query_errors(store, f"Query {name!r}"):
        return run_named(store, query, params)

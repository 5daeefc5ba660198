"""Read-only SQL over an index catalog, named queries from ``sql/*.sql``, and output formats.

Two entry points:

* ``run_sql(index, sql)``: one user-written statement, checked up front (``check_read_only``) and
  run on a catalog connection opened ``read_only=True`` (the real guard: DuckDB refuses to write).
* ``run_query(index, name, **params)``: a *named query*, a ``sql/<name>.sql`` file whose header
  declares it::

      -- name: top_by_score
      -- description: The samples with the highest value of a score column.
      -- param: column (column, default kl_text): the score column to rank by
      -- param: limit (int>=0, default 20): how many samples

  A parameter line is ``-- param: NAME (KIND[>=MIN][, default VALUE])[: description]``. KIND is

  ``int`` / ``float`` / ``text``
      a *value*: converted to that type and bound as the DuckDB parameter ``$NAME``. User values
      never become SQL text. ``default NULL`` binds None.
  ``column``
      an *identifier*: DuckDB cannot bind identifiers, so the SQL writes the placeholder
      ``{{NAME}}`` and the value must be one of the numeric columns of the ``scores`` table (the
      allowlist, read from the catalog: ``score_columns``). Only after that check is every
      ``{{NAME}}`` replaced by the double-quoted column name. Raw user text is never substituted.

  A parameter without a default is required. SQL files without a ``-- name:`` header (internal
  statements such as ``kl_per_sample``) are not named queries.

Results are ``pyarrow.Table``; ``render_table`` / ``write_result`` print or save them as an
aligned table, CSV, JSON lines or parquet.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterable

import duckdb
import pyarrow as pa

from clip_density_index.indexer.errors import ClipIndexError, InvalidParameter, NotReadOnly, UnknownQuery
from clip_density_index.indexer.pool import as_pool
from clip_density_index.queries.outfile import atomic_write, check_out  # noqa: F401 (select, weights import them from here)
from clip_density_index.indexer.store import Store

#: Output formats of ``write_result``.
FORMATS = ("table", "csv", "jsonl", "parquet")
#: File suffix -> output format, used when no format is given.
SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
                  ".parquet": "parquet", ".txt": "table"}
#: Statement kinds ``run_sql`` accepts (DESCRIBE, SHOW, SUMMARIZE, VALUES, FROM-first and WITH ...
#: SELECT all parse as SELECT).
READ_ONLY_KINDS = ("SELECT", "EXPLAIN")
#: Numeric DuckDB types: the columns of ``scores`` with these types form the identifier allowlist.
_NUMERIC = ("DOUBLE", "FLOAT", "REAL", "DECIMAL", "NUMERIC", "TINYINT", "SMALLINT", "INTEGER",
            "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT")
#: Columns of ``scores`` that are keys, not scores.
_NOT_SCORES = ("vec_id",)


#: The head of an EXPLAIN statement: EXPLAIN [ANALYZE] [(options)] (comments before it allowed).
_EXPLAIN = re.compile(r"^(\s|--[^\n]*\n|/\*.*?\*/)*EXPLAIN\s+(ANALY[SZ]E\s+)?(\([^)]*\)\s*)?",
                      re.IGNORECASE | re.DOTALL)


class QueryError(ClipIndexError):
    """A SQL statement failed to parse or run (unknown table or column, type error, ...)."""


# -- connections ------------------------------------------------------------------------------


def read_only_store(index) -> Store:
    """A ``Store`` over the catalog of ``index`` (path or ``PoolIndex``) opened read-only."""
    return as_pool(index).store(read_only=True)


def _arrow(rel: duckdb.DuckDBPyRelation) -> pa.Table:
    """A DuckDB relation as a pyarrow Table (across DuckDB versions), its column names made unique."""
    for name in ("to_arrow_table", "fetch_arrow_table", "arrow"):
        fn = getattr(rel, name, None)
        if fn is not None:
            out = fn()
            out = out.read_all() if isinstance(out, pa.RecordBatchReader) else out
            return out.rename_columns(unique_names(out.column_names))
    raise QueryError("this DuckDB version cannot return arrow tables")  # pragma: no cover


def unique_names(names: list[str]) -> list[str]:
    """Column names with repeats suffixed ``_1``, ``_2``, ... as DuckDB names them in a table
    (``SELECT s.vec_id, w.vec_id`` gives two columns named ``vec_id``; a table, a CSV header or a
    parquet file needs them apart).

    >>> unique_names(["vec_id", "vec_id", "b", "vec_id_1"])
    ['vec_id', 'vec_id_2', 'b', 'vec_id_1']
    """
    taken = set(names)
    out, seen = [], set()
    for name in names:
        new, i = name, 0
        while new in seen or (new != name and new in taken):
            i += 1
            new = f"{name}_{i}"
        seen.add(new)
        out.append(new)
    return out


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


#: DuckDB's words when a read-only connection (``indexer.store.READ_ONLY_CONFIG``) refuses a file.
OUTSIDE_REFUSED = "disabled by configuration"
OUTSIDE_HINT = (" (SQL here reaches the index's catalog tables only: files outside the index cannot be "
                "read, written, attached or loaded)")


def _query_failed(e: duckdb.Error, what: str, store: Store | None = None) -> ClipIndexError:
    """Turn a DuckDB error into a domain error that names the query."""
    msg = _first_line(e)
    if "read-only mode" in msg or "read only mode" in msg:
        return NotReadOnly(f"{what} tried to modify the catalog, which is opened read-only: {msg}")
    hint = ""
    if OUTSIDE_REFUSED in msg:
        hint = OUTSIDE_HINT
    elif store is not None and "scores" in msg and not store.has_table("scores"):
        hint = " (this index has no scores table yet: run `python cli.py score INDEX_DIR` first)"
    elif store is not None and "weights" in msg and not store.has_table("weights"):
        hint = " (this index has no weights table yet: run `python cli.py weights INDEX_DIR --prompt TEXT` first)"
    return QueryError(f"{what} failed: {msg}{hint}")


# -- user SQL -----------------------------------------------------------------------------------
def statement_kinds(sql: str) -> list[str]:
    """The kinds (``SELECT``, ``DELETE``, ``CREATE``, ...) of the statements in ``sql``.

    Raises:
        QueryError: the SQL does not parse.
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(f"Cannot parse SQL {_snippet(sql)!r}: {_first_line(e)}") from None
    return [str(s.type).rsplit(".", 1)[-1].upper() for s in statements]


def _snippet(sql: str, width: int = 80) -> str:
    s = " ".join(sql.split())
    return s if len(s) <= width else s[: width - 1] + "…"


def check_read_only(sql: str) -> None:
    """Reject SQL that is not a single read-only statement, before it reaches the catalog.

    Accepted: SELECT (including WITH ... SELECT, FROM-first, VALUES, DESCRIBE, SHOW, SUMMARIZE)
    and EXPLAIN. Everything else (INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, COPY, ATTACH,
    PRAGMA, SET, LOAD, CALL, EXPORT, ...) raises ``NotReadOnly`` naming the statement kind. The
    catalog connection is read-only as well, so this check is a clear message, not the only guard.

    Raises:
        NotReadOnly: a statement is not read-only.
        QueryError: the SQL does not parse, or holds no statement or more than one.

    >>> check_read_only("SELECT 1")
    >>> check_read_only("DELETE FROM samples")
    Traceback (most recent call last):
    ...
    clip_density_index.indexer.errors.NotReadOnly: Not a read-only query: 'DELETE FROM samples' is a DELETE statement; only SELECT / WITH / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN queries may run here (the catalog is opened read-only)
    """
    kinds = statement_kinds(sql)
    if kinds == ["EXPLAIN"]:  # EXPLAIN ANALYZE runs its statement: that one must be read-only too
        m = _EXPLAIN.match(sql)
        inner = statement_kinds(sql[m.end():]) if m else ["EXPLAIN"]
        if inner != ["SELECT"]:
            kinds = [f"EXPLAIN {inner[0]}" if inner else "EXPLAIN"]
    bad = [k for k in kinds if k not in READ_ONLY_KINDS]
    if bad:
        raise NotReadOnly(
            f"Not a read-only query: {_snippet(sql)!r} is a{'n' if bad[0][0] in 'AEIOU' else ''} "
            f"{bad[0]} statement; only SELECT / WITH / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN "
            "queries may run here (the catalog is opened read-only)"
        )
    if not kinds:
        raise QueryError("Empty SQL: give one SELECT statement")
    if len(kinds) > 1:
        raise QueryError(f"One statement at a time, got {len(kinds)} in {_snippet(sql)!r}")


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
    with read_only_store(index) as store:
        try:
            rel = store.con.sql(sql, params=params or None)
            if rel is None:  # pragma: no cover - a read-only statement always has a result
                return pa.table({})
            return _arrow(rel)
        except duckdb.Error as e:
            raise _query_failed(e, f"SQL {_snippet(sql)!r}", store) from None


# -- allowlisted identifiers --------------------------------------------------------------------
def table_columns(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple[str, str]]:
    """``(name, type)`` of every column of ``table`` (in the main schema), in order."""
    return [
        (r[0], r[1])
        for r in con.execute(
            """SELECT column_name, data_type FROM information_schema.columns
               WHERE table_name = $t AND table_schema = 'main' ORDER BY ordinal_position""",
            {"t": table},
        ).fetchall()
    ]


def score_columns(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The numeric columns of the ``scores`` table: the allowlist for score-column identifiers."""
    return [
        name
        for name, typ in table_columns(con, "scores")
        if name not in _NOT_SCORES and typ.upper().split("(")[0].strip() in _NUMERIC
    ]


def quote_identifier(name: str) -> str:
    """``name`` as a double-quoted SQL identifier.

    >>> quote_identifier("kl_text")
    '"kl_text"'
    """
    return '"' + name.replace('"', '""') + '"'


def check_score_column(con: duckdb.DuckDBPyConnection, column: str, context: str = "") -> str:
    """Return ``column`` if it is a numeric column of ``scores``; else raise naming the valid ones.

    Raises:
        InvalidParameter: the index has no ``scores`` table, ``column`` is not one of its
            numeric columns, or it holds no value (not computed by any score run).
    """
    valid = score_columns(con)
    where = f" ({context})" if context else ""
    if not valid:
        raise InvalidParameter(
            f"Cannot use score column {column!r}{where}: this index has no scores table yet "
            "(run `python cli.py score INDEX_DIR` first)"
        )
    if column not in valid:
        raise InvalidParameter(f"Unknown score column {column!r}{where}; valid columns: {', '.join(valid)}")
    q = quote_identifier(column)
    rows, values = con.execute(f"SELECT count(*), count({q}) FROM scores").fetchall()[0]
    if rows and not values:  # every public column exists; one not computed is all NULL
        metric = column.rsplit("_", 1)[0] if column != "clipscore" else column
        raise InvalidParameter(
            f"Score column {column!r}{where} has no values in this index (it has not been computed): "
            f"run `cli.py score INDEX_DIR --metrics {metric}` first"
        )
    return column


# -- named queries ------------------------------------------------------------------------------
PARAM_KINDS = ("column", "int", "float", "text")
_HEADER = re.compile(r"^--\s*(name|description|param)\s*:\s*(.*?)\s*$")
_PARAM = re.compile(
    r"^(?P<name>[a-z_][a-z0-9_]*)\s*\(\s*(?P<kind>[a-z]+)\s*(?:>=\s*(?P<min>-?\d+(?:\.\d+)?))?"
    r"\s*(?:,\s*default\s+(?P<default>[^)]*?))?\s*\)\s*(?::\s*(?P<desc>.*))?$"
)
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}")
_DOLLAR = re.compile(r"\$([a-z_][a-z0-9_]*)")
_REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One declared parameter of a named query.

    Attributes:
        name: the parameter name (``$name`` or ``{{name}}`` in the SQL).
        kind: "column" (an allowlisted score column), "int", "float" or "text".
        default: the default value (already converted), None for NULL; ``required`` is True when
            there is none.
        minimum: the smallest accepted value of an int / float parameter, or None.
        description: what it means.
    """

    name: str
    kind: str
    default: Any
    required: bool
    minimum: float | None
    description: str

    def convert(self, value: Any, query: str) -> Any:
        """Convert a user value (often a string from the command line) to this parameter's type.

        Raises:
            InvalidParameter: the value has the wrong type or is below the minimum.
        """
        if value is None:
            return None
        if self.kind in ("column", "text"):
            return str(value)
        try:
            if self.kind == "int":
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                out: Any = int(value)
            else:
                out = float(value)
                if not math.isfinite(out):
                    raise ValueError
        except (TypeError, ValueError):
            raise InvalidParameter(
                f"Parameter {self.name!r} of query {query!r} must be "
                f"{'an integer' if self.kind == 'int' else 'a finite number'}, got {value!r}"
            ) from None
        if self.minimum is not None and out < self.minimum:
            raise InvalidParameter(
                f"Parameter {self.name!r} of query {query!r} must be >= {self.minimum:g}, got {value!r}"
            )
        return out

    def describe(self) -> str:
        """One line: ``name (kind, default X): description``."""
        kind = self.kind + (f">={self.minimum:g}" if self.minimum is not None else "")
        default = "required" if self.required else f"default {'NULL' if self.default is None else self.default}"
        return f"{self.name} ({kind}, {default})" + (f": {self.description}" if self.description else "")


@dataclass(frozen=True)
class NamedQuery:
    """A named query: a ``sql/<name>.sql`` file with a ``-- name:`` header.

    Attributes:
        name: the query name (= file name without ``.sql``).
        description: what it returns.
        params: declared parameters, in header order.
        sql: the SQL text (with ``$value`` parameters and ``{{column}}`` placeholders).
    """

    name: str
    description: str
    params: tuple[Param, ...]
    sql: str

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise InvalidParameter(
            f"Unknown parameter {name!r} for query {self.name!r}; its parameters: "
            f"{', '.join(p.name for p in self.params) or 'none'}"
        )


def _parse_param(text: str, query: str) -> Param:
    m = _PARAM.match(text)
    if not m or m["kind"] not in PARAM_KINDS:
        raise QueryError(
            f"sql/{query}.sql: bad parameter declaration {text!r}; expected "
            "'NAME (KIND[>=MIN][, default VALUE])[: description]' with KIND one of "
            + ", ".join(PARAM_KINDS)
        )
    minimum = float(m["min"]) if m["min"] is not None else None
    if minimum is not None and m["kind"] not in ("int", "float"):
        raise QueryError(f"sql/{query}.sql: parameter {m['name']!r}: a minimum needs kind int or float")
    p = Param(m["name"], m["kind"], None, m["default"] is None, minimum, (m["desc"] or "").strip())
    if m["default"] is not None and m["default"].strip().upper() != "NULL":
        default = m["default"].strip()
        if m["kind"] == "text" and len(default) >= 2 and default[0] == default[-1] == "'":
            default = default[1:-1]
        p = Param(p.name, p.kind, p.convert(default, query), False, minimum, p.description)
    return p


def parse_named_query(name: str, text: str) -> NamedQuery | None:
    """Parse the header of a SQL file; None when it declares no ``-- name:``.

    Raises:
        QueryError: the header is inconsistent with the SQL (name differs from the file name, a
            ``$x`` or ``{{x}}`` used but not declared, a declared parameter never used, a
            ``{{x}}`` placeholder for a non-column parameter or a ``$x`` for a column one).
    """
    fields: dict[str, list[str]] = {"name": [], "description": [], "param": []}
    for line in text.splitlines():
        s = line.strip()
        if not s:
            continue
        if not s.startswith("--"):
            break
        m = _HEADER.match(s)
        if m:
            fields[m.group(1)].append(m.group(2))
    if not fields["name"]:
        return None
    declared = fields["name"][0]
    if declared != name:
        raise QueryError(f"sql/{name}.sql declares '-- name: {declared}'; it must match the file name")
    params = tuple(_parse_param(t, name) for t in fields["param"])
    body = "\n".join(line for line in text.splitlines() if not line.strip().startswith("--"))
    kinds = {p.name: p.kind for p in params}
    if len(kinds) != len(params):
        raise QueryError(f"sql/{name}.sql declares a parameter twice")
    used_ids = set(_PLACEHOLDER.findall(body))
    used_vals = set(_DOLLAR.findall(_strip_strings(body)))
    for p in used_ids:
        if kinds.get(p) != "column":
            raise QueryError(f"sql/{name}.sql uses {{{{{p}}}}} but declares no column parameter {p!r}")
    for p in used_vals:
        if p not in kinds or kinds[p] == "column":
            raise QueryError(f"sql/{name}.sql uses ${p} but declares no value parameter {p!r}")
    unused = [p.name for p in params if p.name not in used_ids | used_vals]
    if unused:
        raise QueryError(f"sql/{name}.sql declares parameters it never uses: {', '.join(unused)}")
    return NamedQuery(name, " ".join(fields["description"]), params, text)


def _strip_strings(sql: str) -> str:
    """``sql`` with the contents of single-quoted string literals removed (for ``$x`` scanning)."""
    return re.sub(r"'(?:[^']|'')*'", "''", sql)


@lru_cache(maxsize=None)
def _named_queries() -> dict[str, NamedQuery]:
    out = {}
    for res in files("clip_density_index.sql").iterdir():
        if not res.name.endswith(".sql"):
            continue
        q = parse_named_query(res.name[:-4], res.read_text(encoding="utf-8"))
        if q is not None:
            out[q.name] = q
    return dict(sorted(out.items()))


def list_queries() -> list[NamedQuery]:
    """Every named query shipped in ``sql/``, sorted by name."""
    return list(_named_queries().values())


def get_query(name: str) -> NamedQuery:
    """The named query ``name``.

    Raises:
        UnknownQuery: no such named query (the message lists the available ones).
    """
    queries = _named_queries()
    if name not in queries:
        raise UnknownQuery(f"Unknown query {name!r}; available: {', '.join(queries) or 'none'}")
    return queries[name]


def bind_query(query: NamedQuery, con: duckdb.DuckDBPyConnection, params: dict[str, Any]) -> tuple[str, dict]:
    """The SQL text and ``$`` bindings for running ``query`` with user ``params``.

    Column parameters are validated against ``score_columns`` and only then substituted (quoted)
    for their ``{{name}}`` placeholders; every other parameter is bound.

    Raises:
        InvalidParameter: an unknown parameter, a missing required one, a bad value or an unknown
            score column.
    """
    for key in params:
        query.param(key)  # raises for unknown names
    sql = query.sql
    bindings: dict[str, Any] = {}
    body = _strip_strings(sql)
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
            col = check_score_column(con, value, f"parameter {p.name!r} of query {query.name!r}")
            sql = re.sub(r"\{\{\s*" + p.name + r"\s*\}\}", quote_identifier(col).replace("\\", "\\\\"), sql)
        elif re.search(r"\$" + p.name + r"\b", body):
            bindings[p.name] = value
    return sql, bindings


def run_query(index, name: str, **params: Any) -> pa.Table:
    """Run the named query ``name`` over the catalog of ``index`` (read-only).

    Args:
        index: index directory (str / Path) or an opened ``PoolIndex``.
        name: a named query (see ``list_queries``).
        **params: parameter values (strings are converted to the declared types).

    Returns:
        The result as a ``pyarrow.Table``.

    Raises:
        UnknownQuery: no such named query.
        InvalidParameter: unknown parameter, bad value, or a column not in the ``scores`` table.
        QueryError: the query fails on this index (e.g. a table it needs is missing).
    """
    query = get_query(name)
    with read_only_store(index) as store:
        sql, bindings = bind_query(query, store.con, params)
        check_read_only(sql)
        try:
            return _arrow(store.con.sql(sql, params=bindings or None))
        except duckdb.Error as e:
            raise _query_failed(e, f"Query {name!r}", store) from None


# -- output -------------------------------------------------------------------------------------
def format_for(path: str | Path | None, fmt: str | None) -> str:
    """The output format: ``fmt`` if given, else from ``path``'s suffix, else ``"table"``.

    Raises:
        InvalidParameter: unknown format, or parquet without a file.

    >>> format_for("out.csv", None), format_for(None, None), format_for("x.bin", "jsonl")
    ('csv', 'table', 'jsonl')
    """
    if fmt is None:
        fmt = SUFFIX_FORMATS.get(Path(path).suffix.lower(), "table") if path is not None else "table"
    if fmt not in FORMATS:
        raise InvalidParameter(f"Unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "parquet" and path is None:
        raise InvalidParameter("The parquet format writes a file: give --out FILE.parquet")
    return fmt


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def to_jsonl(table: pa.Table) -> str:
    """One JSON object per row; NaN and infinities become null, other values their JSON form."""
    return "".join(json.dumps(_jsonable(r), default=str, ensure_ascii=False) + "\n" for r in table.to_pylist())


def to_csv(table: pa.Table) -> str:
    """CSV with a header row; lists and structs are written as JSON, NULL as an empty field."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.column_names)
    for row in table.to_pylist():
        w.writerow(
            ["" if v is None else json.dumps(_jsonable(v), default=str, ensure_ascii=False)
             if isinstance(v, (list, dict)) else v for v in row.values()]
        )
    return buf.getvalue()


def _cell(v: Any, width: int) -> str:
    if v is None:
        s = "NULL"
    elif isinstance(v, bool):
        s = str(v).lower()
    elif isinstance(v, float):
        s = f"{v:.6g}"
    elif isinstance(v, (list, tuple)):
        width *= 2  # a list cell (e.g. example captions) may take two cell widths
        each = max(12, width // max(len(v), 1) - 3) if width else 0
        s = "[" + " | ".join(_cell(x, each) for x in v) + "]"
    else:
        s = str(v)
    s = " ".join(s.split()) if ("\n" in s or "\t" in s) else s
    if width and len(s) > width:
        s = s[: width - 1] + "…"
    return s


def render_table(table: pa.Table, max_width: int = 60, footer: bool = True) -> str:
    """An aligned text table: numbers right-aligned, cells longer than ``max_width`` truncated
    with "…" (0: never truncate), floats to 6 significant digits, NULL shown as ``NULL``."""
    cols = table.column_names
    rows = table.to_pylist()
    cells = [[_cell(r[c], max_width) for c in cols] for r in rows]
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
               for t in table.schema.types]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]

    def line(values: Iterable[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ).rstrip()

    out = [line(cols), "  ".join("-" * w for w in widths)] + [line(r) for r in cells]
    if footer:
        out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out) + "\n"


def write_result(table: pa.Table, fmt: str, out: str | Path | None = None, force: bool = False,
                 max_width: int = 60) -> str | None:
    """Render ``table`` as ``fmt``; write it to ``out`` (atomically) or return the text.

    Args:
        table: the result.
        fmt: one of ``FORMATS``.
        out: a file to write, or None to return the text for stdout (not possible for parquet).
        force: overwrite an existing ``out``.
        max_width: cell truncation of the table format (0: none; files are never truncated).

    Returns:
        The text when ``out`` is None, else None.

    Raises:
        InvalidParameter: bad format, parquet without ``out``, or ``out`` exists without ``force``.
    """
    fmt = format_for(out, fmt)
    if out is None:
        if fmt == "csv":
            return to_csv(table)
        if fmt == "jsonl":
            return to_jsonl(table)
        return render_table(table, max_width)
    path = check_out(out, force)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        atomic_write(path, lambda p: pq.write_table(table, p))
        return None
    data = {"csv": to_csv, "jsonl": to_jsonl}.get(fmt, lambda t: render_table(t, 0))(table).encode("utf-8")
    atomic_write(path, lambda p: p.write_bytes(data), size=len(data))
    return None

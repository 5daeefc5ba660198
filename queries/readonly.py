"""The read-only guard: user SQL (``cli.py sql``, named queries) must be ONE read-only statement.

``check_read_only`` names the statement kind before anything reaches the catalog. It is the clear
message, not the only guard: user SQL runs on a catalog connection opened read-only and sandboxed
(``indexer.store.READ_ONLY_CONFIG``), where DuckDB itself refuses every write and every file.
"""

from __future__ import annotations

import re

import duckdb

from clip_density_index.indexer.errors import NotReadOnly, QueryError
from clip_density_index.indexer.store import one_line

#: Statement kinds ``check_read_only`` accepts (DESCRIBE, SHOW, SUMMARIZE, VALUES, FROM-first and
#: WITH ... SELECT all parse as SELECT).
READ_ONLY_KINDS = ("SELECT", "EXPLAIN")

#: The head of an EXPLAIN statement: EXPLAIN [ANALYZE] [(options)] (comments before it allowed).
_EXPLAIN = re.compile(r"^(\s|--[^\n]*\n|/\*.*?\*/)*EXPLAIN\s+(ANALY[SZ]E\s+)?(\([^)]*\)\s*)?",
                      re.IGNORECASE | re.DOTALL)


def snippet(sql: str, width: int = 80) -> str:
    """``sql`` on one line, cut to ``width`` characters, for messages.

    >>> snippet("SELECT *\\n  FROM samples", 12)
    'SELECT * FR…'
    """
    s = " ".join(sql.split())
    return s if len(s) <= width else s[: width - 1] + "…"


def statement_kinds(sql: str) -> list[str]:
    """The kinds (``SELECT``, ``DELETE``, ``CREATE``, ...) of the statements in ``sql`` (DuckDB's
    parser; no connection).

    Raises:
        QueryError: the SQL does not parse.
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(f"Cannot parse SQL {snippet(sql)!r}: {one_line(e)}") from None
    return [str(s.type).rsplit(".", 1)[-1].upper() for s in statements]


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
            f"Not a read-only query: {snippet(sql)!r} is a{'n' if bad[0][0] in 'AEIOU' else ''} "
            f"{bad[0]} statement; only SELECT / WITH / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN "
            "queries may run here (the catalog is opened read-only)"
        )
    if not kinds:
        raise QueryError("Empty SQL: give one SELECT statement")
    if len(kinds) > 1:
        raise QueryError(f"One statement at a time, got {len(kinds)} in {snippet(sql)!r}")

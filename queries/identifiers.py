"""The identifier allowlist: which column names may become SQL identifiers.

DuckDB binds values (``$name``), not identifiers. Where a user names a column (``{{column}}`` in a
named query, ``select --by``, ``--keep COLUMN:F``, the explorer's axes), the name must be one of
the numeric columns of the catalog's ``scores`` table (``score_columns``, read from the catalog
itself); only then does ``indexer.store.fill_identifiers`` put it, double-quoted, into the SQL.
"""

from __future__ import annotations

from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.indexer.store import CatalogConnection

#: Numeric DuckDB types: the columns of ``scores`` with these types form the identifier allowlist.
NUMERIC = ("DOUBLE", "FLOAT", "REAL", "DECIMAL", "NUMERIC", "TINYINT", "SMALLINT", "INTEGER",
           "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT")
#: Columns of ``scores`` that are keys, not scores.
NOT_SCORES = ("vec_id",)


def is_numeric(sql_type: str) -> bool:
    """Whether a DuckDB column type (``DOUBLE``, ``DECIMAL(18,3)``, ...) is numeric.

    >>> is_numeric("DECIMAL(18,3)"), is_numeric("VARCHAR")
    (True, False)
    """
    return sql_type.upper().split("(")[0].strip() in NUMERIC


def numeric_columns(store: CatalogConnection, table: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """The numeric columns of ``table``, in order, without ``exclude``."""
    return [name for name, typ in store.columns(table) if name not in exclude and is_numeric(typ)]


def score_columns(store: CatalogConnection) -> list[str]:
    """The numeric columns of the ``scores`` table: the allowlist for score-column identifiers."""
    return numeric_columns(store, "scores", NOT_SCORES)


def check_score_column(store: CatalogConnection, column: str, context: str = "") -> str:
    """Return ``column`` if it is a numeric column of ``scores``; else raise naming the valid ones.

    Raises:
        InvalidParameter: the index has no ``scores`` table, ``column`` is not one of its
            numeric columns, or it holds no value (not computed by any score run).
    """
    valid = score_columns(store)
    where = f" ({context})" if context else ""
    if not valid:
        raise InvalidParameter(
            f"Cannot use score column {column!r}{where}: this index has no scores table yet "
            "(run `python cli.py score INDEX_DIR` first)"
        )
    if column not in valid:
        raise InvalidParameter(f"Unknown score column {column!r}{where}; valid columns: {', '.join(valid)}")
    counts = store.rows("score_column_counts", {"column": column})[0]
    if counts["rows"] and not counts["filled"]:  # every public column exists; one not computed is all NULL
        metric = column.rsplit("_", 1)[0] if column != "clipscore" else column
        raise InvalidParameter(
            f"Score column {column!r}{where} has no values in this index (it has not been computed): "
            f"run `cli.py score INDEX_DIR --metrics {metric}` first"
        )
    return column

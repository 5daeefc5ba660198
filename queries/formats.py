"""Output formats of query results (``pyarrow.Table``): an aligned text table, CSV, JSON lines, parquet.

``write_result`` prints or saves a result (``cli.py sql`` / ``query``, ``weights --out``,
``sample --out``); files are written atomically and never overwritten without ``force``
(``queries.outfile``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.queries.outfile import atomic_write, check_out

#: Output formats of ``write_result``.
FORMATS = ("table", "csv", "jsonl", "parquet")
#: File suffix -> output format, used when no format is given.
SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
                  ".parquet": "parquet", ".txt": "table"}


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

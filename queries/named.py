"""Named queries: the ``sql/*.sql`` files whose header declares a name, a description and parameters.

A named query's header::

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
    ``{{NAME}}``, and the value must be one of the numeric columns of the ``scores`` table
    (``queries.identifiers``) before it is filled in, double-quoted (``queries.sqlrun.bind_query``).

A parameter without a default is required. A line ``-- uses: NAME`` names a statement of
``sql/internal/`` that defines a temporary macro the query reads (``sample_cards``: the card columns
that top_by_score, bottom_by_score and caption_search share); it runs on the connection before the
query (``queries.sqlrun.run_named``). The files of ``sql/internal/`` (statements the code runs
itself) have no header and are not named queries.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from typing import Any

from clip_density_index.indexer.errors import InvalidParameter, QueryError, UnknownQuery
from clip_density_index.indexer.store import PLACEHOLDER

PARAM_KINDS = ("column", "int", "float", "text")
_HEADER = re.compile(r"^--\s*(name|description|param|uses)\s*:\s*(.*?)\s*$")
_PARAM = re.compile(
    r"^(?P<name>[a-z_][a-z0-9_]*)\s*\(\s*(?P<kind>[a-z]+)\s*(?:>=\s*(?P<min>-?\d+(?:\.\d+)?))?"
    r"\s*(?:,\s*default\s+(?P<default>[^)]*?))?\s*\)\s*(?::\s*(?P<desc>.*))?$"
)
_DOLLAR = re.compile(r"\$([a-z_][a-z0-9_]*)")


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
        uses: the ``sql/internal/`` statements that define the macros it reads, run before it.
    """

    name: str
    description: str
    params: tuple[Param, ...]
    sql: str
    uses: tuple[str, ...] = ()

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
            ``{{x}}`` placeholder for a non-column parameter or a ``$x`` for a column one, a
            ``-- uses:`` naming no statement of ``sql/internal/``).
    """
    fields: dict[str, list[str]] = {"name": [], "description": [], "param": [], "uses": []}
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
    used_ids = set(PLACEHOLDER.findall(body))
    used_vals = set(_DOLLAR.findall(strip_strings(body)))
    for p in used_ids:
        if kinds.get(p) != "column":
            raise QueryError(f"sql/{name}.sql uses {{{{{p}}}}} but declares no column parameter {p!r}")
    for p in used_vals:
        if p not in kinds or kinds[p] == "column":
            raise QueryError(f"sql/{name}.sql uses ${p} but declares no value parameter {p!r}")
    unused = [p.name for p in params if p.name not in used_ids | used_vals]
    if unused:
        raise QueryError(f"sql/{name}.sql declares parameters it never uses: {', '.join(unused)}")
    for used in fields["uses"]:
        _check_uses(name, used)
    return NamedQuery(name, " ".join(fields["description"]), params, text, tuple(fields["uses"]))


def _check_uses(query: str, used: str) -> None:
    """Raise ``QueryError`` unless ``used`` names a statement of ``sql/internal/``."""
    if not (re.match(r"^[a-z][a-z0-9_]*$", used)
            and files("clip_density_index.sql").joinpath("internal", f"{used}.sql").is_file()):
        raise QueryError(f"sql/{query}.sql uses {used!r}, which is not a statement of sql/internal/")


def strip_strings(sql: str) -> str:
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

"""The catalog store: the one place that talks to a catalog's DuckDB connection, and SQL loaded by name.

SQL lives in files: ``sql/*.sql`` are the user-facing named queries, ``sql/internal/*.sql`` the
statements the code runs itself (one statement per file, ``$name`` parameters, ``{{name}}``
identifier placeholders), and schema changes live in ``sql/migrations/NNN_*.sql``, applied in order
and recorded in ``schema_version``. Python builds no SQL text: it fills ``{{name}}`` placeholders with
quoted identifiers that the caller took from an allowlist (the catalog's own tables, the numeric
columns of ``scores``), and appends one ``?`` placeholder per value to a point-lookup statement
(``arrow_in``).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref
from contextlib import contextmanager, suppress
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import duckdb
import pyarrow as pa

from clip_density_index.indexer.errors import (BrokenIndex, ClipIndexError, IndexBusy, IndexNotFound, NotReadOnly,
                                               UnknownQuery)
from clip_density_index.indexer.faults import fault_point

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


#: Where SQL files live: ``sql/`` holds the user-facing named queries (each with a ``-- name:``
#: header; ``cli.py query`` lists them), ``sql/internal/`` the statements the code runs itself, and
#: ``sql/migrations/`` the schema. Named and internal statements are loaded by their bare name, so
#: a name is unique across both folders (tests/test_sql.py checks it).
SQL_DIRS = ("", "internal")


def _sql_files(sub: str):
    folder = files("clip_density_index.sql")
    return (folder.joinpath(sub) if sub else folder).iterdir()


def available() -> list[str]:
    """Names of the SQL files shipped in ``sql/`` and ``sql/internal/``."""
    return sorted(p.name[:-4] for sub in SQL_DIRS for p in _sql_files(sub) if p.name.endswith(".sql"))


@lru_cache(maxsize=None)
def load_sql(name: str) -> str:
    """Return the text of ``sql/<name>.sql`` or ``sql/internal/<name>.sql`` (a migration:
    ``migrations/NNN_name``).

    >>> "CREATE" in load_sql("migrations/001_create_tables").upper()
    True
    >>> "INSERT" in load_sql("weights_insert").upper()
    True
    """
    parts = name.split("/")
    if not all(_NAME.match(p) or re.match(r"^\d{3}_[a-z0-9_]+$", p) for p in parts):
        raise UnknownQuery(f"Unknown query {name!r}; available: {', '.join(available())}")
    root = files("clip_density_index.sql")
    places = [root.joinpath(*parts[:-1], f"{parts[-1]}.sql")]
    if len(parts) == 1:
        places += [root.joinpath(sub, f"{name}.sql") for sub in SQL_DIRS if sub]
    for res in places:
        if res.is_file():
            return res.read_text(encoding="utf-8")
    raise UnknownQuery(f"Unknown query {name!r}; available: {', '.join(available())}")


def migrations() -> list[tuple[int, str]]:
    """(version, name) of every migration, in order."""
    out = []
    for p in files("clip_density_index.sql").joinpath("migrations").iterdir():
        m = re.match(r"^(\d{3})_([a-z0-9_]+)\.sql$", p.name)
        if m:
            out.append((int(m.group(1)), p.name[:-4]))
    return sorted(out)


# -- SQL text ------------------------------------------------------------------------------------
#: An identifier placeholder in a SQL file: ``{{name}}``.
PLACEHOLDER = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}")


def quote_identifier(name: str) -> str:
    """``name`` as a double-quoted SQL identifier.

    >>> quote_identifier("kl_text"), quote_identifier('a"b')
    ('"kl_text"', '"a""b"')
    """
    return '"' + str(name).replace('"', '""') + '"'


def fill_identifiers(sql: str, identifiers: Mapping[str, str | Sequence[str]] | None, what: str = "SQL") -> str:
    """``sql`` with every ``{{name}}`` replaced by the quoted identifier given for ``name`` (a list:
    the quoted identifiers separated by commas). The caller takes the names from an allowlist;
    quoting keeps any name an identifier.

    Raises:
        UnknownQuery: a placeholder has no identifier (a statement asked for the wrong way).

    >>> fill_identifiers("SELECT {{c}}, {{ cols }} FROM t", {"c": "kl_text", "cols": ["a", "b"]})
    'SELECT "kl_text", "a", "b" FROM t'
    """
    given = identifiers or {}

    def fill(m: re.Match) -> str:
        value = given.get(m.group(1))
        if value is None:
            raise UnknownQuery(f"{what} needs an identifier for {{{{{m.group(1)}}}}}")
        return quote_identifier(value) if isinstance(value, str) else ", ".join(map(quote_identifier, value))

    return PLACEHOLDER.sub(fill, sql)


def one_line(e: BaseException) -> str:
    """An error's whole message on one line (DuckDB's ``LINE 1: ...`` pointer into the statement
    included)."""
    text = str(e).strip()
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__


def first_line(e: BaseException) -> str:
    """The first line of an error's message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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


def _to_arrow(rel: duckdb.DuckDBPyRelation | None) -> pa.Table:
    """A DuckDB relation as a pyarrow Table (across DuckDB versions), its column names made unique."""
    if rel is None:  # a statement without a result
        return pa.table({})
    for name in ("to_arrow_table", "fetch_arrow_table", "arrow"):
        fn = getattr(rel, name, None)
        if fn is not None:
            out = fn()
            out = out.read_all() if isinstance(out, pa.RecordBatchReader) else out
            return out.rename_columns(unique_names(out.column_names))
    raise ClipIndexError("this DuckDB version cannot return arrow tables")  # pragma: no cover


def _as_arrow(data: Any) -> Any:
    """What ``registered`` accepts: an Arrow table or a relation as it is, a dict of numpy arrays
    (or lists) as an Arrow table."""
    return pa.table(dict(data)) if isinstance(data, Mapping) else data


#: Open stores by absolute catalog path. DuckDB shares one database per path within a process: while
#: a connection to a catalog that a rebuild has since replaced stays open, a new connection to the
#: same path would read the old, deleted file. ``_close_replaced`` closes such stale connections first.
_OPEN: dict[str, list[weakref.ref]] = {}
_REGISTRY_LOCK = threading.Lock()


def _file_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _close_replaced(key: str, current: tuple[int, int] | None) -> None:
    """Close this process's connections to an older file at ``key`` (a catalog since rebuilt)."""
    with _REGISTRY_LOCK:
        refs = _OPEN.setdefault(key, [])
        stale = [s for s in (r() for r in refs)
                 if s is not None and current is not None and s._file is not None and s._file != current]
        refs[:] = [r for r in refs if r() is not None and r() not in stale]
    for s in stale:
        logger.info("closing a connection to %s: the catalog was replaced since it was opened", key)
        s.con.close()


#: The configuration of every read-only catalog connection (the ones user SQL reaches: ``sql``,
#: ``query``, ``select --where``). ``enable_external_access`` off: no file outside the catalog can be
#: read or written (read_text / read_csv / read_parquet / glob, ATTACH, COPY, INSTALL / LOAD of
#: extensions, secrets); ``lock_configuration``: no ``SET`` can turn it back on. Given at open time,
#: so the catalog file itself opens. DuckDB shares one database per file in a process and refuses a
#: second connection with another configuration, so every read-only ``Store`` uses this one.
READ_ONLY_CONFIG = {"enable_external_access": False, "lock_configuration": True}


#: The words of DuckDB's refusal to write through a read-only connection.
_READ_ONLY_REFUSED = ("read-only mode", "read only mode")

Identifiers = Mapping[str, "str | Sequence[str]"]


def _domain(kind: type[ClipIndexError], head: str, detail: str, values: dict | None) -> ClipIndexError:
    """``kind(head + detail)``; with ``values``, ``head`` is a template naming parameters (the
    detail, DuckDB's words, is never read as one)."""
    if values is None:
        return kind(head + detail)
    return kind.naming(head + "{detail}", **values, detail=detail)


class CatalogConnection:
    """The operations on one connection to a catalog; ``Store`` opens one, ``cursor()`` lends more.

    See ``Store`` for the API. ``con`` is the DuckDB connection itself: no product code outside
    this module uses it (tests/test_store.py checks).
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, path: str, read_only: bool):
        self.con = con
        self.path = path
        self.read_only = read_only

    # -- statements by name -------------------------------------------------------------------
    def sql(self, name: str, identifiers: Identifiers | None = None) -> str:
        """The text of the statement ``name`` with its ``{{...}}`` identifiers filled."""
        return fill_identifiers(load_sql(name), identifiers, f"SQL {name!r}")

    def run(self, name: str, identifiers: Identifiers | None = None, **params: Any):
        """Execute the statement ``name`` with ``$param`` bindings; returns DuckDB's result (read it
        with ``fetchall()``; ``rows`` / ``value`` / ``arrow`` read it for you)."""
        return self._execute(name, identifiers, params)

    def _execute(self, name: str, identifiers: Identifiers | None, params: dict[str, Any]):
        sql = self.sql(name, identifiers)
        return self.con.execute(sql, params) if params else self.con.execute(sql)

    def rows(self, name: str, identifiers: Identifiers | None = None, **params: Any) -> list[dict]:
        """The rows of the statement ``name``, as dicts."""
        cur = self._execute(name, identifiers, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def value(self, name: str, identifiers: Identifiers | None = None, **params: Any) -> Any:
        """The first value of the first row of the statement ``name`` (None without a row)."""
        rows = self._execute(name, identifiers, params).fetchall()  # fetchall: no half-read result left
        return rows[0][0] if rows else None

    def arrow(self, name: str, identifiers: Identifiers | None = None, **params: Any) -> pa.Table:
        """The result of the statement ``name`` as a ``pyarrow.Table`` (repeated column names made
        unique: ``vec_id``, ``vec_id_1``)."""
        return _to_arrow(self.con.sql(self.sql(name, identifiers), params=params or None))

    def arrow_in(self, name: str, values: Sequence[Any]) -> pa.Table:
        """The result of the statement ``name``, which ends in ``IN``, for ``values``: one bound
        ``?`` per value is appended, ``(?, ?, ...)``, so that DuckDB looks each one up through an
        index (a list bound as one parameter, ``= ANY($ids)``, scans the table)."""
        sql = load_sql(name).rstrip() + " (" + ", ".join(["?"] * len(values)) + ")"
        return _to_arrow(self.con.sql(sql, params=list(values)))

    def relation(self, name: str, *, where: str | None = None,
                 identifiers: Identifiers | None = None) -> duckdb.DuckDBPyRelation:
        """The statement ``name`` as a lazy relation, to pass to ``registered``. ``where``: only the
        rows that satisfy a user's SQL condition, parsed by DuckDB's expression parser as ONE
        expression (``1=1) UNION (SELECT ...`` does not parse), never pasted into SQL text."""
        rel = self.con.sql(self.sql(name, identifiers))
        return rel.filter(where) if where is not None else rel

    # -- SQL text the code does not own ---------------------------------------------------------
    def arrow_text(self, sql: str, params: dict | list | None = None) -> pa.Table:
        """The result of SQL text as a ``pyarrow.Table``: a user's statement (``cli.py sql``), or a
        named query whose identifiers were checked and filled (``cli.py query``)."""
        return _to_arrow(self.con.sql(sql, params=params or None))

    def query(self, sql: str, params: dict | None = None) -> Iterator[dict]:
        """Run SQL text and yield rows as dicts (tests and interactive use)."""
        cur = self.con.execute(sql, params or {})
        cols = [d[0] for d in cur.description]
        for row in cur.fetchall():
            yield dict(zip(cols, row))

    # -- data in ------------------------------------------------------------------------------
    @contextmanager
    def registered(self, **data: Any) -> Iterator["CatalogConnection"]:
        """Make Arrow tables, dicts of numpy arrays or relations (``relation``) readable by name in
        the statements run inside the block (``SELECT ... FROM _ids``); forgotten after it. When
        the block raises inside a transaction, DuckDB refuses to forget them until the rollback:
        the block's error is the one raised."""
        for name, value in data.items():
            self.con.register(name, _as_arrow(value))
        try:
            yield self
        except BaseException:
            for name in data:
                with suppress(duckdb.Error):
                    self.con.unregister(name)
            raise
        for name in data:
            self.con.unregister(name)

    def insert(self, name: str, data: Mapping[str, Any], **params: Any) -> None:
        """Run the statement ``name`` (an ``INSERT ... SELECT ... FROM <name>``) with ``data``
        registered by name (see ``registered``) and ``$param`` bindings."""
        with self.registered(**data):
            self._execute(name, None, params)

    # -- transactions -------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator["CatalogConnection"]:
        """One transaction: committed when the block ends, rolled back when it raises (a
        ``KeyboardInterrupt`` included)."""
        self.con.begin()
        try:
            yield self
            self.con.commit()
        except BaseException:
            try:
                self.con.rollback()
            except duckdb.Error:  # a failed commit has ended it already
                pass
            raise

    def checkpoint(self) -> str | None:
        """Write the committed changes from the write-ahead log into the catalog file. Returns None,
        or DuckDB's message when that failed (e.g. a full disk): not an error, since the write-ahead
        log keeps the committed change and DuckDB replays it on the next open."""
        try:
            self.con.execute("CHECKPOINT")  # a command of DuckDB's, not a query
        except duckdb.Error as e:
            return one_line(e)
        return None

    # -- schema -------------------------------------------------------------------------------
    def tables(self) -> list[str]:
        """Names of the catalog's tables and views, sorted."""
        return [r["table_name"] for r in self.rows("catalog_tables")]

    def has_table(self, table: str) -> bool:
        return bool(self.value("catalog_table_exists", t=table))

    def columns(self, table: str) -> list[tuple[str, str]]:
        """``(name, type)`` of every column of ``table`` (in the main schema), in order."""
        return [(r["column_name"], r["data_type"]) for r in self.rows("catalog_table_columns", t=table)]

    def table_counts(self) -> dict[str, int]:
        """Rows of every table, by name, sorted (the names come from the catalog itself)."""
        return {t: int(self.value("catalog_table_count", {"table": t})) for t in self.tables()}

    def schema_version(self) -> int:
        if not self.has_table("schema_version"):
            return 0
        return int(self.value("schema_version_current") or 0)

    def migrate(self) -> None:
        """Apply the migrations newer than ``schema_version``."""
        current = self.schema_version()
        for version, name in migrations():
            if version > current:
                self._execute(f"migrations/{name}", None, {})
                self._execute("schema_version_insert", None, {"v": version})

    # -- errors -------------------------------------------------------------------------------
    def error(self, e: BaseException, subject: str, kind: type[ClipIndexError] = BrokenIndex,
              hint: str | Callable[[str], str] = "", *, syntax: str | None = None,
              whole: bool = True, values: dict | None = None) -> ClipIndexError:
        """A DuckDB error as a domain error: ``kind("<subject> failed: <DuckDB's message><hint>")``.

        A write refused by this read-only connection is ``NotReadOnly`` naming the catalog; with
        ``syntax``, a statement or condition that does not parse is ``kind("<syntax>: <message>")``.
        ``hint``: text appended to the message, or a function of DuckDB's message giving it.
        ``whole``: DuckDB's whole message on one line (with its ``LINE 1:`` pointer into the
        statement), else its first line (a damaged file's messages go on for lines).
        ``values``: ``subject`` and ``syntax`` are templates naming parameters (``"{where}
        {value!r}"``, see ``ClipIndexError.naming``) filled with these values.
        """
        msg = one_line(e) if whole else first_line(e)
        if any(words in msg for words in _READ_ONLY_REFUSED):
            return _domain(NotReadOnly, f"{subject} tried to modify the catalog ",
                           f"{self.path}, which is opened read-only: {msg}", values)
        if syntax is not None and isinstance(e, duckdb.ParserException):
            return _domain(kind, f"{syntax}: ", msg, values)
        return _domain(kind, f"{subject} failed: ", msg + (hint(msg) if callable(hint) else hint), values)

    @contextmanager
    def errors(self, subject: str, kind: type[ClipIndexError] = BrokenIndex,
               hint: str | Callable[[str], str] = "", *, syntax: str | None = None,
               whole: bool = True, values: dict | None = None) -> Iterator["CatalogConnection"]:
        """A block whose DuckDB errors are raised as domain errors (see ``error``)."""
        try:
            yield self
        except duckdb.Error as e:
            raise self.error(e, subject, kind, hint, syntax=syntax, whole=whole, values=values) from None

    # -- threads ------------------------------------------------------------------------------
    @contextmanager
    def cursor(self) -> Iterator["CatalogConnection"]:
        """Another connection to the same database for the block, with its own registered names,
        temporary tables and transaction: threads that share a kept reader (the explorer, sample)
        each take one."""
        cur = self.con.cursor()
        try:
            yield CatalogConnection(cur, self.path, self.read_only)
        finally:
            cur.close()


class Store(CatalogConnection):
    """A DuckDB catalog, and the only code that touches its connection. Use as a context manager.

    ``wait``: seconds to keep retrying while another process holds the file (DuckDB lets one
    process write, or several read); then ``IndexBusy``.

    A read-only store is also sandboxed (``READ_ONLY_CONFIG``): its SQL reaches the catalog's own
    tables and nothing else on the machine.

    Statements are named: ``name`` is ``sql/<name>.sql`` or ``sql/internal/<name>.sql`` (``load_sql``);
    ``**params`` bind its ``$param`` values; ``identifiers`` fill its ``{{name}}`` placeholders with
    quoted identifiers that the caller took from an allowlist (a list fills a comma-separated list).

    Reading:
        ``rows(name, identifiers, **params)``: a list of dicts; ``value(...)``: the first value;
        ``arrow(...)``: a ``pyarrow.Table``; ``arrow_in(name, values)``: point lookups with a
        statement that ends in ``IN``; ``run(...)``: DuckDB's result, for ``fetchall()``.
        ``arrow_text(sql, params)`` runs SQL text the code does not own (a user's statement, a
        named query with its identifiers filled); ``query(sql)`` yields dicts (tests).
    Writing:
        ``registered(**data)``: Arrow tables, dicts of numpy arrays or relations readable by name
        inside the block; ``insert(name, {"_rows": table}, **params)`` runs an ``INSERT ... FROM
        _rows`` statement with them; ``relation(name, where=...)``: a statement as a relation to
        register, filtered by a user's condition parsed as one expression.
        ``transaction()``: committed at the end of the block, rolled back when it raises.
        ``checkpoint()``: None, or DuckDB's message when it failed (the change stays in the WAL).
    Schema:
        ``tables()``, ``has_table(t)``, ``columns(t)``, ``table_counts()``, ``schema_version()``,
        ``migrate()``.
    Errors:
        ``errors(subject, kind, hint)`` (a context manager) and ``error(e, ...)`` turn DuckDB's
        errors into ``ClipIndexError`` subclasses: ``kind("<subject> failed: <message><hint>")``, or
        ``NotReadOnly`` naming the catalog for a write through a read-only store. Opening raises
        ``IndexNotFound``, ``IndexBusy`` or ``BrokenIndex``, naming the catalog.
    Threads:
        ``cursor()``: another connection to the same database for a block (the explorer's threads
        share one kept reader, ``PoolIndex.reader``).

    >>> with Store(":memory:") as s:
    ...     s.migrate()
    ...     s.schema_version() == migrations()[-1][0]
    True
    """

    def __init__(self, path: str | Path, read_only: bool = False, must_exist: bool = False, wait: float = 0.0):
        path = str(path)
        if must_exist and path != ":memory:" and not Path(path).is_file():
            raise IndexNotFound(f"No catalog at {path}")
        self.path, self.read_only = path, read_only
        self._key, self._file = None, None
        if self.path != ":memory:":
            self._key = os.path.abspath(self.path)
            self._file = _file_identity(self._key)
            _close_replaced(self._key, self._file)
        deadline, said = time.monotonic() + wait, False
        while True:  # another process holding the file: retry for up to ``wait`` seconds
            try:
                con = self._connect()
                break
            except IndexBusy as e:
                if time.monotonic() >= deadline:
                    raise
                if not said:
                    logger.warning("%s; waiting up to %.0f s", e, wait)
                    said = True
                time.sleep(0.25)
        super().__init__(con, path, read_only)
        if self._key is not None:
            self._file = _file_identity(self._key)  # the file DuckDB opened (it may have created it)
            with _REGISTRY_LOCK:
                _OPEN.setdefault(self._key, []).append(weakref.ref(self))

    def _connect(self) -> duckdb.DuckDBPyConnection:
        read_only = self.read_only
        try:
            return duckdb.connect(self.path, read_only=read_only, config=READ_ONLY_CONFIG if read_only else {})
        except duckdb.IOException as e:
            first = str(e).splitlines()[0]
            if "lock" in first.lower():
                pid = re.search(r"\(PID (\d+)\)", first)
                who = f"another process (PID {pid.group(1)})" if pid else "another process"
                if read_only:  # only a writer blocks a reader
                    raise IndexBusy(f"The catalog {self.path} is open for writing in {who}; wait for it "
                                    "to finish") from None
                raise IndexBusy(f"The catalog {self.path} is open in {who}: a running command, or a "
                                "Python session whose PoolIndex keeps a reader open (pool.close() there "
                                "releases it)") from None
            raise BrokenIndex(f"Cannot open the catalog {self.path}: {first}") from None
        except duckdb.Error as e:  # a damaged file: DuckDB's block checksums, a bad header
            raise BrokenIndex(f"Cannot open the catalog {self.path}: it is damaged ({first_line(e)}); rebuild the "
                              "index with `cli.py build-index`") from None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()
        with _REGISTRY_LOCK:
            refs = _OPEN.get(self._key, [])
            refs[:] = [r for r in refs if r() is not None and r() is not self]

    # --- build-side operations: what indexer.build writes into a new catalog ---------------------
    def _run_on(self, name: str, tables: dict[str, Any], **params: Any) -> None:
        """Execute ``sql/internal/<name>.sql`` with Arrow ``tables`` registered under their keys
        (the names the statement reads) for the duration of the statement."""
        with self.registered(**tables):
            self.run(name, **params)

    def write_samples(self, meta: Any, create: bool = False) -> None:
        """Add a batch of ``samples`` rows (an Arrow table whose first column is ``vec_id``);
        ``create``: the first batch, whose columns make the table."""
        self._run_on("samples_create" if create else "samples_append", {"_batch": meta})

    def index_samples(self) -> None:
        """Index ``samples.vec_id``, once the table is complete."""
        self.run("samples_index")

    def first_duplicate_uid(self) -> tuple[str, int, int] | None:
        """``(uid, vec_id, vec_id)`` of the first uid two samples share, or None."""
        rows = self.run("samples_duplicate_uid").fetchall()
        if not rows:
            return None
        uid, (a, b) = rows[0]
        return uid, int(a), int(b)

    def insert_stats(self, stats: list[tuple[str, str, Any]]) -> None:
        """Insert ``(modality, name, array)`` rows into ``modality_stats`` (shape and row-major
        float64 values), as one Arrow table."""
        import numpy as np
        import pyarrow as pa

        def lists(arrays: list, type_: Any) -> Any:
            offsets = np.concatenate([[0], np.cumsum([a.size for a in arrays])]).astype(np.int32)
            values = np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0)
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=type_))

        arrays = [np.asarray(v, dtype=np.float64) for _, _, v in stats]
        table = pa.table({
            "modality": [m for m, _, _ in stats], "name": [k for _, k, _ in stats],
            "shape": lists([np.asarray(v.shape, dtype=np.int64) for v in arrays], pa.int64()),
            "value": lists(arrays, pa.float64()),
        })
        self._run_on("modality_stats_insert", {"_stats": table})

    def insert_manifest(self, **columns: Any) -> None:
        """Insert the manifest row; ``columns`` are the manifest's columns by name."""
        self.run("manifest_insert", **columns)

    def insert_data_files(self, files: list[dict]) -> None:
        """Insert the build's ``data_files`` records (``indexer.integrity.record``)."""
        import pyarrow as pa

        self._run_on("data_files_insert", {"_files": pa.Table.from_pylist(files)})

    def finish_catalog(self) -> None:
        """Write the write-ahead log into the new catalog file; unlike ``checkpoint``, DuckDB's
        error (a full disk) is raised: a build is not done until its catalog is written."""
        self.run("checkpoint")

    # --- scoring operations (queries/score_store.py: the atomic replace of `scores`) -------------
    def replace_scores(self, ranges: Iterable[tuple[int, int, Any]], sources: dict[str, str],
                       allowed: tuple[str, ...], rows: int, record: Any) -> Any:
        """Replace ``scores`` in one transaction: create ``scores__new`` empty, append to it the
        rows of the samples and of every range in ``ranges``, check it has ``rows`` rows, swap it
        in, and call ``record()`` (the run's bookkeeping inserts) before the commit; returns what
        ``record`` returns. A failure or a kill at any point leaves the old table and no
        ``scores__new``.

        ``ranges``: ``(lo, hi, table)`` in vec_id order, ``table`` an Arrow table of ``vec_id`` lo..hi - 1
        and the computed columns (the same in every range); one is read at a time, so the caller
        can make each from its column files when it is asked for. ``sources`` maps every score
        column, in table order, to ``"new"`` (from the ranges), ``"old"`` (carried over from the
        current ``scores``) or ``"null"``; each must be in ``allowed`` (the identifier allowlist:
        ``queries.score_params.SCORE_COLUMNS``).
        """
        exprs = []
        for column, source in sources.items():
            if column not in allowed or not _NAME.match(column) or source not in ("new", "old", "null"):
                raise ValueError(f"score column {column!r} ({source!r}) is not in the allowlist")
            exprs.append({"new": f"c.{column}", "old": f"o.{column}", "null": f"CAST(NULL AS DOUBLE) AS {column}"}
                         [source])
        carry = load_sql("scores_new_carry") if "old" in sources.values() else ""
        select = load_sql("scores_new_rows").format(columns=", ".join(exprs), carry=carry)
        create, append = (load_sql(name).format(rows=select) for name in ("scores_new_create", "scores_new_append"))
        with self.transaction():
            self.run("scores_new_drop")
            for i, (lo, hi, table) in enumerate(ranges):
                with self.registered(_new_scores=table):
                    if i == 0:
                        self.con.execute(create, {"lo": lo, "hi": hi})
                    self.con.execute(append, {"lo": lo, "hi": hi})
                fault_point("score.store_range")
            got = self.value("scores_new_count")
            if got != rows:
                raise BrokenIndex(f"{self.path}: samples has {got} rows matching vec_id 0..{rows - 1}, not {rows}")
            self.run("scores_drop")
            self.run("scores_new_rename")
            return record()

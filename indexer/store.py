"""The catalog store: one small object over a DuckDB connection, and SQL loaded by name.

SQL lives in ``sql/*.sql`` (one statement per file, ``$name`` parameters); schema changes live in
``sql/migrations/NNN_*.sql`` and are applied in order, recorded in ``schema_version``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterator

import duckdb

from clip_density_index.indexer.errors import BrokenIndex, IndexBusy, IndexNotFound, UnknownQuery

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


class Store:
    """A DuckDB catalog. Use as a context manager; ``run`` executes a named SQL file.

    ``wait``: seconds to keep retrying while another process holds the file (DuckDB lets one
    process write, or several read); then ``IndexBusy``.

    A read-only store is also sandboxed (``READ_ONLY_CONFIG``): its SQL reaches the catalog's own
    tables and nothing else on the machine.

    >>> with Store(":memory:") as s:
    ...     s.migrate()
    ...     s.schema_version()
    1
    """

    def __init__(self, path: str | Path, read_only: bool = False, must_exist: bool = False, wait: float = 0.0):
        self.path = str(path)
        if must_exist and self.path != ":memory:" and not Path(self.path).is_file():
            raise IndexNotFound(f"No catalog at {self.path}")
        self.read_only = read_only
        self._key, self._file = None, None
        if self.path != ":memory:":
            self._key = os.path.abspath(self.path)
            self._file = _file_identity(self._key)
            _close_replaced(self._key, self._file)
        deadline, said = time.monotonic() + wait, False
        while True:  # another process holding the file: retry for up to ``wait`` seconds
            try:
                self.con = self._connect()
                break
            except IndexBusy as e:
                if time.monotonic() >= deadline:
                    raise
                if not said:
                    logger.warning("%s; waiting up to %.0f s", e, wait)
                    said = True
                time.sleep(0.25)
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
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BrokenIndex(f"Cannot open the catalog {self.path}: it is damaged ({first}); rebuild the "
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

    def run(self, name: str, **params: Any) -> duckdb.DuckDBPyConnection:
        """Execute ``sql/<name>.sql`` with ``$param`` bindings; returns the cursor."""
        sql = load_sql(name)
        return self.con.execute(sql, params) if params else self.con.execute(sql)

    def query(self, sql: str, params: dict | None = None) -> Iterator[dict]:
        """Run SQL text and yield rows as dicts."""
        cur = self.con.execute(sql, params or {})
        cols = [d[0] for d in cur.description]
        for row in cur.fetchall():
            yield dict(zip(cols, row))

    def has_table(self, table: str) -> bool:
        # fetchall, not fetchone: DuckDB 2.0 leaves a half-read result open, and the next
        # ``register`` on the connection then fails with "unfinished result".
        rows = self.con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = $t", {"t": table}
        ).fetchall()
        return bool(rows[0][0])

    def schema_version(self) -> int:
        if not self.has_table("schema_version"):
            return 0
        v = self.con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0]
        return int(v or 0)

    def migrate(self) -> None:
        """Apply the migrations newer than ``schema_version``."""
        current = self.schema_version()
        for version, name in migrations():
            if version > current:
                self.con.execute(load_sql(f"migrations/{name}"))
                self.con.execute("INSERT INTO schema_version VALUES ($v)", {"v": version})

    # --- scoring operations (queries/score_store.py: the atomic replace of `scores`) -------------

    def table_columns(self, table: str) -> list[str]:
        """The column names of ``table``, in order; empty when there is no such table."""
        return [r[0] for r in self.run("table_columns", table=table).fetchall()]

    def replace_scores(self, new: Any, sources: dict[str, str], allowed: tuple[str, ...], rows: int,
                       record: Any) -> Any:
        """Replace ``scores`` in one transaction: build ``scores__new`` from the samples and the
        Arrow table ``new`` (``vec_id`` + the computed columns), check it has ``rows`` rows, swap
        it in, and call ``record()`` (the run's bookkeeping inserts) before the commit; returns what
        ``record`` returns. A failure or a kill at any point leaves the old table and no
        ``scores__new``.

        ``sources`` maps every score column, in table order, to ``"new"`` (from ``new``), ``"old"``
        (carried over from the current ``scores``) or ``"null"``; each must be in ``allowed`` (the
        identifier allowlist: ``queries.score_params.SCORE_COLUMNS``).
        """
        exprs = []
        for column, source in sources.items():
            if column not in allowed or not _NAME.match(column) or source not in ("new", "old", "null"):
                raise ValueError(f"score column {column!r} ({source!r}) is not in the allowlist")
            exprs.append({"new": f"c.{column}", "old": f"o.{column}", "null": f"CAST(NULL AS DOUBLE) AS {column}"}
                         [source])
        carry = load_sql("scores_new_carry") if "old" in sources.values() else ""
        create = load_sql("scores_new_create").format(columns=", ".join(exprs), carry=carry)
        self.con.register("_new_scores", new)
        self.con.begin()
        try:
            self.run("scores_new_drop")
            self.con.execute(create)
            got = self.run("scores_new_count").fetchall()[0][0]
            if got != rows:
                raise BrokenIndex(f"{self.path}: samples has {got} rows matching vec_id 0..{rows - 1}, not {rows}")
            self.run("scores_drop")
            self.run("scores_new_rename")
            out = record()
            self.con.commit()
        except BaseException:
            self.con.rollback()
            raise
        finally:
            self.con.unregister("_new_scores")
        return out

    def try_checkpoint(self) -> str | None:
        """Write the write-ahead log into the catalog file; the error's first line when that fails
        (a full disk: what was committed stays in the log, replayed on the next open), else None."""
        try:
            self.con.execute("CHECKPOINT")
        except duckdb.Error as e:
            text = str(e).strip()
            return text.splitlines()[0] if text else type(e).__name__
        return None

"""KL-guided data selection (SPEC 9): keep the top fraction of the pool by a score column.

Rules, exactly:

1. The rows are ``samples`` joined with ``scores`` (one per sample).
2. ``where`` (optional, a SQL boolean expression over their columns, e.g. ``clipscore > 0.7``)
   applies FIRST. It is user SQL: it must not contain ``;``, it must parse as ONE expression
   (DuckDB's expression parser, so ``1=1) UNION (SELECT ...`` is rejected), and it runs on a
   catalog connection opened read-only.
3. Rows whose score is NULL or NaN cannot be ranked and are dropped; the rest are the candidates
   (``candidates`` in the result).
4. ``kept = floor(F * candidates)`` with the fraction F taken as the decimal written (``0.29`` is
   exactly 29/100, so no binary rounding surprise), but at least 1 when there is any candidate.
5. The kept rows are the ``kept`` candidates with the highest score (``lowest=True``: the lowest),
   ties broken by uid (ascending), so the selection is deterministic.

Output files (by suffix): ``.npy`` is the DataComp subset format (``np.dtype("u8,u8")``, each uid
of 32 hex digits split as ``(int(uid[:16], 16), int(uid[16:32], 16))``, sorted); ``.txt`` one uid
per line, sorted; ``.parquet`` columns ``rank, uid, vec_id, <score>`` in rank order (best first).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from clip_density_index.indexer.errors import BadInput, InvalidParameter
from clip_density_index.indexer.store import CatalogConnection
from clip_density_index.indexer.validate import UID_PATTERN
from clip_density_index.queries.identifiers import check_score_column
from clip_density_index.queries.outfile import atomic_write, check_out
from clip_density_index.queries.sqlrun import OUTSIDE_HINT, OUTSIDE_REFUSED, query_errors, read_only_store

#: Output suffixes ``select`` writes.
SUBSET_SUFFIXES = (".npy", ".parquet", ".txt")
_UID = re.compile(UID_PATTERN)


@dataclass
class Selection:
    """What ``select`` kept.

    Attributes:
        by: the score column ranked by.
        fraction: the fraction F asked for.
        lowest: True when the lowest scores were kept.
        where: the filter expression, or None.
        total: rows in the pool (samples with a scores row).
        passed_where: rows that passed ``where`` (= total without one).
        candidates: rows that passed ``where`` and have a non-NULL, non-NaN score.
        kept: rows kept, ``max(1, floor(F * candidates))`` (0 when there is no candidate).
        threshold: the score of the last kept row (None when nothing is kept).
        table: the kept rows in rank order: ``rank, uid, vec_id, <by>``.
        out: the file written, or None.
    """

    by: str
    fraction: float
    lowest: bool
    where: str | None
    total: int
    passed_where: int
    candidates: int
    kept: int
    threshold: float | None
    table: pa.Table
    out: Path | None = None

    @property
    def uids(self) -> list[str]:
        """Kept uids, in rank order."""
        return self.table.column("uid").to_pylist()


def kept_count(fraction: float, count: int) -> int:
    """``floor(F * count)``, at least 1 when ``count > 0``; F read as the decimal it prints as.

    >>> kept_count(0.25, 10), kept_count(0.29, 100), kept_count(0.01, 5), kept_count(0.5, 0)
    (2, 29, 1, 0)
    """
    if count <= 0:
        return 0
    return max(1, math.floor(Fraction(repr(float(fraction))) * count))


def check_fraction(fraction: float) -> float:
    """Return ``fraction`` if it is in (0, 1].

    Raises:
        InvalidParameter: otherwise (naming the value).
    """
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise InvalidParameter.naming("{top_fraction} must be a number in (0, 1], got {value!r}",
                                      value=fraction) from None
    if not (0.0 < f <= 1.0):
        raise InvalidParameter.naming("{top_fraction} must be in (0, 1] (e.g. 0.25 keeps a quarter), got {value!r}",
                                      value=fraction)
    return f


def check_where(where: str) -> str:
    """Cheap up-front checks of a ``--where`` expression (the parse and read-only run follow).

    Raises:
        InvalidParameter: empty, or contains ``;`` (one expression, never a second statement).
    """
    if not where or not where.strip():
        raise InvalidParameter.naming("{where} is empty; give a SQL condition such as \"clipscore > 0.7\"")
    if ";" in where:
        raise InvalidParameter.naming(
            "{where} {value!r} contains ';': it must be a single SQL condition such as \"clipscore > 0.7\"",
            value=where)
    return where


@contextmanager
def selection_rows(store: CatalogConnection) -> Iterator[int]:
    """Within the block, ``_select_base`` is ``samples`` joined with ``scores`` on their shared keys
    (vec_id, and uid when scores has it); yields its row count."""
    score_cols = {c for c, _ in store.columns("scores")}
    keys = [k for k in ("vec_id", "uid") if k in score_cols]
    if "vec_id" not in keys:
        raise BadInput("The scores table has no vec_id column; re-run `python cli.py score INDEX_DIR`")
    with query_errors(store, "select"):
        base = store.relation("select_base", identifiers={"keys": keys})
    with store.registered(_select_base=base):
        with query_errors(store, "select"):
            total = int(store.value("select_base_count"))
        yield total


def evaluate_once(store: CatalogConnection, source: str, where: str | None, column: str) -> None:
    """Filter the rows of the statement ``source`` by ``where`` and store the rows that pass (uid,
    vec_id and the score column ``column`` as ``score``) in the temporary table ``_select_passed``:
    the condition runs exactly once (``random() < 0.5`` gave three different row sets to three
    counts), and everything after reads that table."""
    subject, syntax, values = "select", None, None
    if where is not None:
        subject, syntax = "{where} {value!r}", "{where} {value!r} is not a single SQL condition"
        values = {"value": where}
    with store.errors(subject, InvalidParameter, lambda msg: OUTSIDE_HINT if OUTSIDE_REFUSED in msg else "",
                      syntax=syntax, values=values):
        with store.registered(_select_source=store.relation(source, where=where)):
            store.run("select_passed_create", {"score": column})


def passed_counts(store: CatalogConnection) -> tuple[int, int]:
    """``(passed, candidates)`` of ``_select_passed``: its rows, and those with a score that is
    neither NULL nor NaN (they can be ranked)."""
    with query_errors(store, "select"):
        counts = store.rows("select_counts")[0]
    return counts["passed"], counts["candidates"]


def kept_rows(store: CatalogConnection, kept: int, lowest: bool) -> pa.Table:
    """The ``kept`` rows of ``_select_passed`` with the highest scores (``lowest``: the lowest),
    ties broken by uid: ``rank, uid, vec_id, score``."""
    with query_errors(store, "select"):
        return store.arrow("select_kept", kept=int(kept), lowest=bool(lowest))


def check_subset_out(out: str | Path | None, force: bool) -> Path | None:
    """The subset file a selection writes, checked before any work: a known suffix, and no
    existing file without ``force``."""
    if out is None:
        return None
    out_path = Path(out)
    if out_path.suffix.lower() not in SUBSET_SUFFIXES:
        raise InvalidParameter(f"Output {str(out_path)!r}: unknown suffix; use one of "
                               f"{', '.join(SUBSET_SUFFIXES)} (.npy = DataComp subset format)")
    check_out(out_path, force)
    return out_path


def select(
    index,
    by: str,
    top_fraction: float,
    *,
    where: str | None = None,
    lowest: bool = False,
    out: str | Path | None = None,
    force: bool = False,
) -> Selection:
    """Keep the top fraction of the pool by a score column, optionally after a filter.

    Args:
        index: index directory (str / Path) or an opened ``PoolIndex``.
        by: the score column (a numeric column of ``scores``, e.g. ``kl_text``).
        top_fraction: F in (0, 1]; ``max(1, floor(F * candidates))`` rows are kept.
        where: a SQL condition over ``samples`` and ``scores`` columns, applied first.
        lowest: keep the lowest scores instead of the highest.
        out: write the selection: ``.npy`` (DataComp subset), ``.parquet`` or ``.txt``.
        force: overwrite an existing ``out``.

    Returns:
        A ``Selection`` (counts, threshold and the kept rows).

    Raises:
        InvalidParameter: unknown score column (the message lists the valid ones), F outside
            (0, 1], a bad ``where``, an unknown ``out`` suffix, or ``out`` exists without ``force``.
        BadInput: a uid is not 32 hex digits (only for ``.npy``).
    """
    fraction = check_fraction(top_fraction)
    if where is not None:
        check_where(where)
    out_path = check_subset_out(out, force)
    with read_only_store(index) as store:
        col = check_score_column(store, by)
        with selection_rows(store) as total:
            evaluate_once(store, "select_base_rows", where, col)
            passed, candidates = passed_counts(store)
            kept = kept_count(fraction, candidates)
            table = kept_rows(store, kept, lowest).rename_columns(["rank", "uid", "vec_id", col])
    if not kept and out_path is not None:
        why = f"no sample passed --where {where!r}" if where is not None and not passed else \
            f"no sample has a value of {col!r}"
        raise InvalidParameter(f"Nothing to select: {why} ({passed:,} of {total:,} passed); {out_path} not written")
    threshold = table.column(col)[-1].as_py() if kept else None
    sel = Selection(col, fraction, lowest, where, total, passed, candidates, kept, threshold, table)
    if out_path is not None:
        write_selection(sel, out_path, force=True)
        sel.out = out_path
    return sel


def datacomp_subset(uids: list[str]) -> np.ndarray:
    """uids (32 hex digits) as the DataComp subset array: dtype ``u8,u8``, sorted.

    Raises:
        BadInput: a uid is not 32 hex digits.

    >>> datacomp_subset(["00000000000000020000000000000001", "0000000000000001ffffffffffffffff"]).tolist()
    [(1, 18446744073709551615), (2, 1)]
    """
    arr = np.empty(len(uids), dtype=np.dtype("u8,u8"))
    for i, uid in enumerate(uids):
        u = str(uid).lower()
        if not _UID.match(u):
            raise BadInput(f"uid {uid!r} is not 32 hex digits: it cannot be written in the DataComp subset format")
        arr[i] = (int(u[:16], 16), int(u[16:32], 16))
    arr.sort(order=["f0", "f1"])
    return arr


def write_selection(sel: Selection, out: str | Path, force: bool = False) -> Path:
    """Write a selection by suffix (``.npy`` DataComp subset, ``.txt``, ``.parquet``), atomically.

    Raises:
        InvalidParameter: unknown suffix, or ``out`` exists without ``force``.
    """
    path = Path(out)
    suffix = path.suffix.lower()
    if suffix not in SUBSET_SUFFIXES:
        raise InvalidParameter(f"Output {str(path)!r}: unknown suffix; use one of {', '.join(SUBSET_SUFFIXES)}")
    check_out(path, force)
    if suffix == ".npy":
        arr = datacomp_subset(sel.uids)

        def write(p: Path) -> None:
            with open(p, "wb") as f:
                np.save(f, arr)
    elif suffix == ".txt":
        text = "".join(u + "\n" for u in sorted(sel.uids))

        def write(p: Path) -> None:
            p.write_text(text, encoding="utf-8")
    else:
        import pyarrow.parquet as pq

        def write(p: Path) -> None:
            pq.write_table(sel.table, p)
    atomic_write(path, write)
    return path

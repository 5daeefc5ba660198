"""DataComp-style selection: fractions of the whole pool, and their intersections (``select --keep``).

DataComp's baselines think in fractions of the pool ("CLIP L/14 score top 30%") and in
intersections of such sets ("CLIP L/14 top 30% AND text KL top 25%"). ``select_keep`` takes one or
more ``Keep(column, fraction, lowest)`` and one of two modes:

* ``mode="pool"`` (default): each keep is the top ``floor(F x N)`` rows of the WHOLE pool by its
  column (N = samples with a scores row), computed independently; the result is the intersection
  of the sets, and of ``where`` when given. Its size is at most the smallest keep. The order of the
  keeps does not matter.
* ``mode="filtered"``: filter, then rank, as ``select --where ... --top-fraction`` always did:
  ``where`` first, then each keep in the order given takes its fraction of the rows still left
  that have a value (``floor(F x left)``; in pool mode rows without a value count in N). ``--keep clipscore:0.3 --keep kl_text:0.25`` keeps 0.3 x 0.25 = 7.5% of the
  pool: a quarter of the best-aligned 30%.

Counting, ranking and ties follow ``queries.selection`` exactly (NULL / NaN scores are never kept;
ties broken by uid ascending; at least one row when any can be ranked). ``count="paper"`` keeps
``floor(F x N) + 1`` rows per step, as the paper's selection code does (capped at the candidates).

The kept rows are returned in rank order of the FIRST keep (``rank, uid, vec_id`` and every keep
column) and written as ``select`` writes (``.npy`` DataComp subset, ``.txt``, ``.parquet``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.indexer.store import CatalogConnection
from clip_density_index.queries.identifiers import check_score_column, numeric_columns, score_columns
from clip_density_index.queries.selection import (
    check_fraction,
    check_subset_out,
    check_where,
    evaluate_once,
    kept_count,
    kept_rows,
    passed_counts,
    selection_rows,
    write_selection,
)
from clip_density_index.queries.sqlrun import query_errors, read_only_store

KEEP_MODES = ("pool", "filtered")
COUNT_RULES = ("floor", "paper")
_KEEP = re.compile(r"^\s*([^:]+?)\s*:\s*([^:]+?)\s*(?::\s*(lowest|highest)\s*)?$", re.IGNORECASE)


@dataclass(frozen=True)
class Keep:
    """Keep ``fraction`` of the rows by ``column``: the highest values (``lowest``: the lowest)."""

    column: str
    fraction: float
    lowest: bool = False

    def __str__(self) -> str:
        return f"{self.column}:{self.fraction:g}" + (":lowest" if self.lowest else "")


def parse_keep(text: str) -> Keep:
    """``"COLUMN:FRACTION"`` or ``"COLUMN:FRACTION:lowest"`` -> ``Keep``.

    >>> parse_keep("clip_l14_similarity_score:0.3"), parse_keep("dc_text:0.5:lowest").lowest
    (Keep(column='clip_l14_similarity_score', fraction=0.3, lowest=False), True)

    Raises:
        InvalidParameter: not of that form, or a fraction outside (0, 1].
    """
    m = _KEEP.match(str(text))
    if not m:
        raise InvalidParameter(f"--keep {text!r} is not COLUMN:FRACTION (e.g. kl_text:0.25, or "
                               "dc_text:0.5:lowest)")
    try:
        fraction = float(m.group(2))
    except ValueError:
        raise InvalidParameter(f"--keep {text!r}: the fraction {m.group(2)!r} is not a number") from None
    if not (0.0 < fraction <= 1.0):
        raise InvalidParameter(f"--keep {text!r}: the fraction must be in (0, 1] (0.25 keeps a quarter)")
    return Keep(m.group(1), fraction, (m.group(3) or "").lower() == "lowest")


@dataclass
class KeepStep:
    """One keep's part: ``kept`` of ``of`` rows (``candidates`` of them could be ranked), and the
    score of its last kept row (``threshold``)."""

    keep: Keep
    of: int
    candidates: int
    kept: int
    threshold: float | None


@dataclass
class KeepSelection:
    """What ``select_keep`` kept: the steps, the counts and the kept rows (rank order of the first
    keep: ``rank, uid, vec_id`` and each keep's column)."""

    keeps: list[Keep]
    mode: str
    count: str
    where: str | None
    total: int
    passed_where: int
    steps: list[KeepStep]
    table: pa.Table
    out: Path | None = None
    _: dict = field(default_factory=dict, repr=False)

    @property
    def kept(self) -> int:
        return self.table.num_rows

    @property
    def uids(self) -> list[str]:
        return self.table.column("uid").to_pylist()


def _count(fraction: float, n: int, rule: str) -> int:
    k = kept_count(fraction, n)
    return min(n, k + 1) if rule == "paper" and n > 0 else k


def _check_column(store: CatalogConnection, column: str) -> str:
    """``column`` if it is a numeric column of ``samples`` (source metadata such as DataComp's
    ``clip_l14_similarity_score``) or of ``scores``; else raise naming the valid ones."""
    meta = numeric_columns(store, "samples", ("vec_id",))
    if column in meta:
        return column
    try:
        return check_score_column(store, column, "--keep")
    except InvalidParameter as e:
        if column in score_columns(store) or not meta:
            raise
        raise InvalidParameter(f"{e}; numeric columns of samples: {', '.join(meta)}") from None


def _parse_keeps(keeps: list[Keep | str], mode: str, count: str, where: str | None) -> list[Keep]:
    """The keeps, checked with the mode, the count rule and ``where`` before anything is read."""
    parsed = [k if isinstance(k, Keep) else parse_keep(k) for k in keeps]
    if not parsed:
        raise InvalidParameter.naming("{keeps} is empty: give at least one Keep or 'COLUMN:FRACTION'")
    for k in parsed:
        check_fraction(k.fraction)
    if mode not in KEEP_MODES:
        raise InvalidParameter(f"Unknown selection mode {mode!r}; choose one of {', '.join(KEEP_MODES)}")
    if count not in COUNT_RULES:
        raise InvalidParameter(f"Unknown count rule {count!r}; choose one of {', '.join(COUNT_RULES)}")
    if where is not None:
        check_where(where)
    return parsed


def _keep_step(store: CatalogConnection, k: Keep, mode: str, count: str,
               left: np.ndarray | None) -> tuple[KeepStep, np.ndarray]:
    """One keep over ``_select_base`` (within ``selection_rows``), or over the rows ``left`` in
    filtered mode: its step and the vec_ids it keeps."""
    if mode == "filtered" and left is not None:
        with store.registered(_keep_left={"vec_id": np.asarray(left, dtype=np.int64)}):
            evaluate_once(store, "select_base_left", None, k.column)
    else:
        evaluate_once(store, "select_base_rows", None, k.column)
    of, candidates = passed_counts(store)
    # pool: a fraction of every row (DataComp); filtered: of the rows left that can be ranked,
    # exactly as select --by --top-fraction counts
    n = min(_count(k.fraction, of if mode == "pool" else candidates, count), candidates)
    top = kept_rows(store, n, k.lowest)
    threshold = top.column("score")[-1].as_py() if top.num_rows else None
    kept_ids = top.column("vec_id").to_numpy()
    return KeepStep(k, of, candidates, len(kept_ids), threshold), kept_ids


def _rows_of(store: CatalogConnection, ids: np.ndarray, columns: list[str]) -> pa.Table:
    """``uid, vec_id`` and ``columns`` of the rows ``ids`` of ``_select_base``."""
    with store.registered(_keep_ids={"vec_id": np.sort(np.asarray(ids, dtype=np.int64))}):
        with query_errors(store, "select"):
            return store.arrow("keep_rows", {"columns": list(dict.fromkeys(columns))})


def select_keep(
    index,
    keeps: list[Keep | str],
    *,
    where: str | None = None,
    mode: str = "pool",
    count: str = "floor",
    out: str | Path | None = None,
    force: bool = False,
) -> KeepSelection:
    """Keep fractions of the pool by several score or metadata columns and intersect them.

    Args:
        index: index directory or an opened ``PoolIndex``.
        keeps: ``Keep`` or ``"COLUMN:FRACTION[:lowest]"`` strings; any numeric column of
            ``samples`` (e.g. DataComp's ``clip_l14_similarity_score``) or ``scores``.
        where: a SQL condition over ``samples`` and ``scores`` columns (see ``queries.selection``).
        mode: "pool" (each fraction of the whole pool, intersected) or "filtered" (``where``
            first, then each keep on what is left, in order).
        count: "floor" (``floor(F x N)``) or "paper" (``floor(F x N) + 1``).
        out: write ``.npy`` (DataComp subset), ``.txt`` or ``.parquet``.
        force: overwrite an existing ``out``.

    Raises:
        InvalidParameter: no keep, a bad keep, mode or count, an unknown column (listing the
            valid ones), a bad ``where``, an unknown ``out`` suffix, ``out`` exists without
            ``force``, or nothing is kept while ``out`` is asked for.
    """
    parsed = _parse_keeps(keeps, mode, count, where)
    out_path = check_subset_out(out, force)
    steps: list[KeepStep] = []
    with read_only_store(index) as store:
        cols = [_check_column(store, k.column) for k in parsed]
        with selection_rows(store) as total:
            ids: np.ndarray | None = None  # rows still in the selection (None: all of them)
            passed_where = total
            if where is not None:
                evaluate_once(store, "select_base_rows", where, cols[0])
                with query_errors(store, "select"):
                    ids = store.arrow("select_passed_ids").column("vec_id").to_numpy()
                passed_where = len(ids)
            for k in parsed:
                step, kept_ids = _keep_step(store, k, mode, count, ids)
                steps.append(step)
                ids = kept_ids if ids is None else np.intersect1d(ids, kept_ids)
            rows = _rows_of(store, ids, cols)
    first = parsed[0]
    rows = rows.sort_by([(first.column, "ascending" if first.lowest else "descending"), ("uid", "ascending")])
    table = pa.table({"rank": pa.array(np.arange(1, rows.num_rows + 1, dtype=np.int64)),
                      **{name: rows.column(name) for name in rows.column_names}})
    sel = KeepSelection(parsed, mode, count, where, total, passed_where, steps, table)
    if out_path is not None:
        if not sel.kept:
            raise InvalidParameter(f"Nothing to select: the keeps {', '.join(map(str, parsed))} have no row in "
                                   f"common ({mode} mode); {out_path} not written")
        write_selection(sel, out_path, force=True)
        sel.out = out_path
    return sel

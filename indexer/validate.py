"""Per-batch checks the builder runs on every source: shapes, finite non-zero vectors, uids (every
error names the origin file and the row within it); and ``check_seed``, for every command's seed.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clip_density_index.indexer.errors import BadInput, InvalidParameter
from clip_density_index.indexer.source import Batch

#: A uid: 32 lowercase hex digits (128 bits, the DataComp convention). The one definition: the
#: readers, the builder and the DataComp subset writer check uids with it.
UID_PATTERN = r"^[0-9a-f]{32}$"


def _where(batch: Batch, row: int) -> str:
    return f"{batch.origin}, row {batch.row_offset + int(row)}"


def check_rows(batch: Batch, name: str, arr: np.ndarray, norms: np.ndarray) -> None:
    """Raise ``BadInput`` naming the first row of ``arr`` that is not finite or is all zeros.

    ``norms`` are the rows' Euclidean norms (the builder computes them anyway to normalise): a
    row is finite and non-zero exactly when its norm is finite and positive, so the full arrays are
    only scanned again when something is wrong.
    """
    ok = np.isfinite(norms) & (norms > 0)
    if ok.all():
        return
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise BadInput(f"{_where(batch, bad)}: {name} embedding contains NaN or inf")
    zero = ~np.any(arr != 0, axis=1)
    if zero.any():
        bad = int(np.flatnonzero(zero)[0])
        raise BadInput(f"{_where(batch, bad)}: {name} embedding is all zeros (cannot be normalised)")
    bad = int(np.flatnonzero(~ok)[0])  # finite values whose squares overflow float32
    raise BadInput(f"{_where(batch, bad)}: {name} embedding is too large to normalise (norm overflows)")


def validate_batch(batch: Batch, dim: int, check_uids: bool = True) -> None:
    """Raise ``BadInput`` if the shape or the uids of ``batch`` are malformed.

    Checks: ``meta`` has ``uid`` and ``caption`` columns and as many rows as both arrays; both arrays
    are 2-D with ``dim`` columns; uids are 32 lowercase hex digits. Uniqueness is checked by the
    builder over the whole pool at once (one GROUP BY in DuckDB, naming both files and rows).
    Values are checked by ``check_rows``.
    """
    rows = batch.meta.num_rows
    for col in ("uid", "caption"):
        if col not in batch.meta.column_names:
            raise BadInput(f"{batch.origin}: no {col!r} column (columns: {', '.join(batch.meta.column_names)})")
    for name, arr in (("image", batch.image), ("text", batch.text)):
        if arr.ndim != 2:
            raise BadInput(f"{batch.origin}: {name} embeddings have shape {arr.shape}, expected (rows, {dim})")
        if arr.shape[1] != dim:
            raise BadInput(
                f"{batch.origin}: {name} embeddings have dimension {arr.shape[1]}, expected {dim} "
                "(dimension mismatch between files or modalities)"
            )
        if arr.shape[0] != rows:
            raise BadInput(
                f"{batch.origin}: {arr.shape[0]} {name} embeddings but {rows} metadata rows "
                "(row counts disagree)"
            )
    if not check_uids:  # the source guarantees them (SourceInfo.uids_checked)
        return
    uid = batch.meta.column("uid")
    if uid.null_count:
        bad = int(np.flatnonzero(uid.is_null().to_numpy(zero_copy_only=False))[0])
        raise BadInput(f"{_where(batch, bad)}: uid is missing")
    ok = pc.match_substring_regex(pc.cast(uid, pa.string()), UID_PATTERN).to_numpy(zero_copy_only=False)
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise BadInput(
            f"{_where(batch, bad)}: malformed uid {uid[bad].as_py()!r} (expected 32 lowercase hex digits)"
        )


def check_seed(seed: int) -> int:
    """``seed`` if numpy's generators and the catalog's BIGINT columns take it, else ``InvalidParameter``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise InvalidParameter(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
    return int(seed)

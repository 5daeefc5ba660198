"""The SQL step of the approximate KL estimators: per-query sums in, ``(query, kl, klr, ...)`` out.

Each estimator reduces its own per-query sums to ``log Z_hat``, ``E_hat[s]`` and the exact mean
score in a statement of ``sql/internal/`` (``kl_per_sample``: MIMPS, ``queries.estimate``;
``kl_strata``: ``queries.strata``); both turn those into D_KL and D_KLR with the one formula of
SPEC 2, the macro ``kl_scores`` of ``sql/internal/kl_formula.sql``, which ``run_kl_statement``
creates on the connection before it runs the statement.
"""

from __future__ import annotations

from typing import Mapping

import pyarrow as pa

from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.indexer.store import CatalogConnection


def run_kl_statement(con, name: str, tables: Mapping[str, pa.Table], n: int, b: float | None = None) -> pa.Table:
    """Run the KL statement ``sql/internal/<name>.sql`` over arrow tables.

    Args:
        con: a DuckDB connection (an in-memory one: no catalog); the macro ``kl_scores`` is
            (re)created on it, and ``tables`` are registered on it by name for the call.
        name: ``kl_per_sample`` or ``kl_strata``.
        tables: the statement's inputs by the names it reads them under.
        n: N, the number of candidates (``$n``).
        b: SigLIP logit bias, or None for CLIP (``$bias``).

    Returns:
        The statement's result as an arrow table.

    Raises:
        InvalidParameter: SigLIP scores (``b`` given) with fewer than 2 candidates.
    """
    if b is not None and n < 2:
        raise InvalidParameter(f"SigLIP scores need at least 2 candidates, got N={n}")
    db = CatalogConnection(con, ":memory:", read_only=False)
    db.run("kl_formula")
    with db.registered(**tables):
        return db.arrow(name, n=int(n), bias=b)

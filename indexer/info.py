"""A summary of a built index: manifest, counts, files and per-modality statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clip_density_index.indexer.integrity import verify
from clip_density_index.indexer.layout import MODALITIES
from clip_density_index.indexer.pool import open_index


def verify_index(path: str | Path) -> list[dict]:
    """Check every data file of the index at ``path`` against its build (``indexer.integrity.verify``):
    full checksums, unit norms, column sums, statistics. One dict (file, result, detail) per check."""
    pool = open_index(path)
    try:
        return [{"file": f, "result": r, "detail": d} for f, r, d in verify(pool)]
    finally:
        pool.close()


def index_info(path: str | Path) -> dict:
    """Manifest, table row counts, file sizes and a statistics summary of the index at ``path`` (a
    directory or a URI: ``path`` is then its local mirror, ``uri`` the URI)."""
    pool = open_index(path)
    with pool.store(read_only=True) as s:
        counts = s.table_counts()
        runs = s.rows("score_run_latest") if "score_runs" in counts else []
        if runs:  # the accuracy that run measured for its scores (SPEC 3.2)
            runs[0]["checks"] = s.rows("score_checks_of_run", run_id=runs[0]["run_id"])
    stats = {}
    for m in MODALITIES:
        mean = pool.stat(m, "mean")
        cov = pool.stat(m, "cov")
        n = pool.n
        # mean pairwise cosine of unit vectors (self-pairs excluded): (||sum||^2 - n) / (n (n-1))
        total = pool.stat(m, "sum")
        stats[m] = {
            "norm_of_mean": float(np.linalg.norm(mean)),
            "total_variance": float(np.trace(cov)),
            "mean_pairwise_cosine": float((total @ total - n) / (n * (n - 1))) if n > 1 else float("nan"),
        }
        if pool.raw_known:
            raw_mean, raw_cov = pool.stat(m, "raw_mean"), pool.stat(m, "raw_cov")
            stats[m]["raw_mean_over_std"] = float(np.linalg.norm(raw_mean) / np.sqrt(np.trace(raw_cov)))
    files = {p.name: p.stat().st_size for p in sorted(pool.root.iterdir())
             if p.is_file() and not p.name.startswith(".")}  # not the lock file
    return {"path": str(pool.root), "uri": pool.uri, "manifest": pool.manifest, "tables": counts, "files": files,
            "stats": stats, "last_score_run": runs[0] if runs else None, "notes": pool.notes}

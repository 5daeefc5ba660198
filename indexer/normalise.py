"""One batch of raw vectors -> float32 unit rows and their norms, checked row by row.

The builder runs this on every batch of every source (in its own process, or on the workers of a
Ray build): rows that are not finite, all zeros or too large to normalise are named by
``validate.check_rows``; norms float32 gets wrong (tiny or huge vectors) are recomputed in float64.
"""

from __future__ import annotations

import numpy as np

from clip_density_index.indexer.arrays import copy_cast
from clip_density_index.indexer.source import Batch
from clip_density_index.indexer.validate import check_rows

#: Below this float32 norm, components are small enough that their squares lose precision.
_TINY_NORM = 1e-15


def normalise_rows(batch: Batch, modality: str, raw: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Write the rows of ``raw`` (one modality of ``batch``, float16 / float32, maybe a memory map)
    into ``out`` (float32, same shape) as unit vectors; return their norms (float32).

    Raises:
        BadInput: a row that is not finite, all zeros or too large to normalise (naming the
            batch's origin and the row).
    """
    copy_cast(out, raw)
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))
    renorm_extremes(out, norms)
    check_rows(batch, modality, out, norms)
    np.divide(out, norms[:, None], out=out)
    return norms


def renorm_extremes(v: np.ndarray, norms: np.ndarray) -> None:
    """Recompute in float64 the norms float32 gets wrong: tiny vectors (their squares are subnormal
    or underflow to 0: a 1e-21-scaled vector came out with |v| off by 2e-4) and huge ones (their
    squares overflow). All-zero and non-finite rows keep their 0 / inf / NaN for ``check_rows``."""
    odd = ~(np.isfinite(norms) & (norms > _TINY_NORM))
    if odd.any():
        rows = np.flatnonzero(odd)
        x = v[rows].astype(np.float64)
        scale = np.abs(x).max(axis=1, initial=0.0)
        ok = np.isfinite(scale) & (scale > 0)
        safe = np.where(ok, scale, 1.0)
        exact = safe * np.sqrt(((x / safe[:, None]) ** 2).sum(axis=1))  # scaled: no under/overflow
        norms[rows] = np.where(ok, exact, norms[rows]).astype(norms.dtype)

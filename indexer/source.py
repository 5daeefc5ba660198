"""What every input source hands the builder: a header (``SourceInfo``) and a stream of ``Batch``.

A source never normalises or validates vectors itself beyond its own file-level checks (missing
files, row counts that disagree between files, dimension mismatch between files); the builder
validates every batch (NaN / inf / all-zero rows, dimensions, uids) and names ``origin`` and the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np
import pyarrow as pa


@dataclass
class SourceInfo:
    source: str  # a name of indexer.sources.SOURCES, or ArraySource's name ("arrays" by default)
    n: int  # number of samples the source will yield in total
    dim: int
    raw_known: bool  # True: vectors are raw (unnormalised) model outputs, their norms are kept
    logit_scale: float  # a = exp(model.logit_scale)
    logit_bias: float | None = None  # SigLIP bias b
    model: str | None = None
    pretrained: str | None = None
    synthetic: bool = False
    #: type the source's embeddings are stored in ("float16" for DataComp / clip-retrieval files
    #: written in half precision); ``build_index(dtype="auto")`` stores the index's copy in it
    dtype: str = "float32"
    #: True when the source itself guarantees uids of 32 lowercase hex digits (it validated or
    #: derived them); the builder then skips its own per-batch pattern check
    uids_checked: bool = False
    extra: dict = field(default_factory=dict)  # JSON-able, stored in manifest.extra


@dataclass
class Batch:
    """A slice of the pool. ``meta`` has at least ``uid`` (32 lowercase hex digits) and ``caption``
    (string) columns; any other column is source metadata and is kept in ``samples``."""

    meta: pa.Table
    image: np.ndarray  # (b, dim) float16 or float32 (maybe a memory-map view), raw if SourceInfo.raw_known
    text: np.ndarray  # (b, dim), as image
    origin: str  # file (or "synthetic") the rows came from, for error messages
    row_offset: int = 0  # index of the first row within ``origin``


class Source(Protocol):
    info: SourceInfo

    def batches(self, batch_size: int) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class Part:
    """A piece of a source that can be read on its own (a Ray build reads parts in parallel).

    A source that can be split has ``parts()`` (every part, in pool order) and
    ``read_part(part, batch_size)`` (its batches; the source object is copied to the worker), and
    may have ``finish_part(meta)``, run on the driver in pool order (clip-retrieval derives uids
    that depend on every row before them there)."""

    index: int  # position among the parts
    start: int  # first row, counted in the source's listing
    rows: int  # rows listed: what it yields unless unreadable samples are skipped
    key: object = None  # the source's own description (a shard number, ...)

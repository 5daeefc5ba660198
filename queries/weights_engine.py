"""``weights`` and ``sample`` over a partitioned pool, as tasks on an engine (``indexer.engine``;
``--engine ray``).

The pool is split into vec_id ranges (``partitions``). A task opens the index itself (a path every
worker reads, or a URI its node mirrors; memory-mapped embeddings, read-only), computes its
images' cosines with the prompt (``weighting.image_cosines`` on its range) and returns its part;
the driver (the process that runs the command) merges the parts, and stores and writes
everything, as the local engine does:

- ``weights``: the partition's cosines and its normalisation partial ``LogSums`` (max, sum of
  ``exp(x - max)`` and of ``exp(2 (x - max))`` of the log weights), merged associatively in log
  space into ``log mean(w)`` and the ESS.
- ``sample --mode top``: the partition's exact top n (``weighting.top_rows``); merged, the top n of
  the union, ties broken by vec_id as the local ``--exact`` does.
- ``sample --mode draw``: a Gumbel-top-k per partition, with the noise of its vec_ids in the local
  draw's stream (``weighting.gumbel_noise``): the merged top n of the keys is the local draw of the
  same seed. With replacement: a first pass of partials gives each partition's share of the total
  weight; the driver draws the local draw's uniforms, maps each to its partition, and a second pass
  finds each one's image by the partition's cumulative weights (the local ``Generator.choice``
  inverts the cumulative weights of the whole pool with the same uniforms; the two agree up to
  floating-point rounding at the boundaries between images, a chance of about 1e-16 per row).

A task whose worker dies is retried by the engine and recomputes its partition; the driver takes
one result per partition, so nothing is lost or counted twice. A ``ClipIndexError`` in a task (a
damaged embedding row, an index rebuilt under the run) comes back as a value and is raised by the
driver as the same one-line error.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clip_density_index.indexer.errors import ClipIndexError, InvalidParameter
from clip_density_index.indexer.pool import PoolIndex, task_index
from clip_density_index.queries.weighting import DEFAULT_CHUNK, gumbel_noise, image_cosines, top_rows

#: The most images in one partition (1M x 768 float32: 3 GB read in ``DEFAULT_CHUNK`` rows; the
#: task returns 8 bytes of cosine per image for ``weights``).
PARTITION_ROWS = 1 << 20
#: Partitions per worker a run aims for when the pool is small enough to give every worker more
#: than one (a lost worker's partition then reruns beside the others' rather than after them).
TASKS_PER_WORKER = 2
#: The fewest images in a partition when the pool is split for the workers' sake.
MIN_PARTITION_ROWS = 4096


# -- the normalisation partial ----------------------------------------------------------------


@dataclass(frozen=True)
class LogSums:
    """Sums of ``w = exp(x)`` and ``w^2`` over a block of log weights ``x``, kept in log space:
    ``n`` values, their ``max`` m, ``s1 = sum exp(x - m)``, ``s2 = sum exp(2 (x - m))``.
    ``merge`` is associative and commutative (up to rounding), so blocks merge in any tree."""

    n: int
    max: float
    s1: float
    s2: float

    @classmethod
    def of(cls, x: np.ndarray) -> "LogSums":
        x = np.asarray(x, dtype=np.float64)
        if x.shape[0] == 0:
            return cls(0, -math.inf, 0.0, 0.0)
        m = float(np.max(x))
        z = np.exp(x - m)
        return cls(int(x.shape[0]), m, float(np.sum(z)), float(np.sum(z * z)))

    def merge(self, other: "LogSums") -> "LogSums":
        m = max(self.max, other.max)
        if m == -math.inf:  # both empty
            return LogSums(self.n + other.n, m, 0.0, 0.0)
        f, g = math.exp(self.max - m), math.exp(other.max - m)
        return LogSums(self.n + other.n, m, self.s1 * f + other.s1 * g, self.s2 * f * f + other.s2 * g * g)

    @property
    def log_sum(self) -> float:
        """``log sum w``."""
        return self.max + math.log(self.s1)

    @property
    def log_mean(self) -> float:
        """``log mean w``."""
        return self.log_sum - math.log(self.n)

    @property
    def ess(self) -> float:
        """``(sum w)^2 / sum w^2`` (the max cancels)."""
        return self.s1 * self.s1 / self.s2


def merge_sums(parts: Sequence[LogSums]) -> LogSums:
    """Merge partials pairwise in a balanced tree, in the order given (the same result every run)."""
    if not parts:
        raise ValueError("no partials to merge")
    level = list(parts)
    while len(level) > 1:
        level = [level[i].merge(level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
    return level[0]


# -- partitions and the engine -------------------------------------------------------------------


def partitions(n: int, workers: int = 1, rows: int | None = None) -> list[tuple[int, int]]:
    """vec_id ranges ``(lo, hi)`` covering ``0..n``: ``rows`` images each (the last fewer), or by
    default at most ``PARTITION_ROWS`` each and at least ``TASKS_PER_WORKER`` per worker where
    partitions of ``MIN_PARTITION_ROWS`` allow.

    Raises:
        InvalidParameter: ``rows`` is not a positive integer.
    """
    if rows is None:
        parts = max(-(-n // PARTITION_ROWS), min(TASKS_PER_WORKER * max(1, workers), -(-n // MIN_PARTITION_ROWS)))
        rows = max(1, -(-n // max(1, parts)))
    elif isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
        raise InvalidParameter.naming("{partition_rows} must be a positive integer, got {value!r}", value=rows)
    return [(lo, min(lo + int(rows), n)) for lo in range(0, n, int(rows))]


@contextlib.contextmanager
def opened(engine: str | Any, address: str | None = None) -> Iterator[Any]:
    """The engine that runs the partitions' tasks (``indexer.engine.engine_for``: one already open,
    used as it is, a ``LocalEngine`` running them in this process; or one opened here by name and
    closed on exit); None for ``"local"`` by name, the unpartitioned code of ``weighting``."""
    from clip_density_index.indexer.engine import engine_for

    with engine_for(engine, address) as eng:
        yield None if isinstance(engine, str) and eng.name == "local" else eng


def held_rows(engine, pool_n: int, n: int, mode: str, replace: bool, partition_rows: int | None = None) -> int:
    """Rows of the pool the driver holds in ``sample`` on ``engine``: each partition's top n
    (``replace``: none, only the n draws)."""
    if mode == "draw" and replace:
        return 0
    return min(pool_n, n * len(partitions(pool_n, engine.workers, partition_rows)))


# -- the tasks (module level: every worker imports them) -----------------------------------------


@dataclass(frozen=True)
class PartContext:
    """What every task of a run receives (put in the engine's object store once)."""

    root: str  # the index's location (PoolIndex.location: a directory or a URI)
    created_at: str
    vector: np.ndarray  # the prompt, float64, unit length
    a: float  # a'
    n: int = 0  # sample: rows asked for
    seed: int = 0  # sample --mode draw
    chunk: int = DEFAULT_CHUNK


@dataclass(frozen=True)
class Failed:
    """A task's ``ClipIndexError``, returned as a value so that the driver raises it as it is."""

    error: ClipIndexError


def _cosines(item: tuple[int, int], ctx: PartContext) -> np.ndarray:
    lo, hi = item[0], item[1]
    return image_cosines(task_index(ctx.root, ctx.created_at), ctx.vector, ctx.chunk, lo=lo, hi=hi)


def _guarded(part: Callable, item: Any, ctx: PartContext) -> Any:
    """``part(item, ctx)``, or its ``ClipIndexError`` as a ``Failed`` value."""
    try:
        return part(item, ctx)
    except ClipIndexError as e:
        return Failed(e)


def _weights_task(item: tuple[int, int], ctx: PartContext) -> tuple[np.ndarray, LogSums]:
    """``weights``: the partition's cosines and the partial of its log weights."""
    cos = _cosines(item, ctx)
    return cos, LogSums.of(ctx.a * cos)


def _top_task(item: tuple[int, int], ctx: PartContext) -> tuple[np.ndarray, np.ndarray]:
    """``sample --mode top``: the partition's exact top n ``(vec_ids, cosines)``."""
    return top_rows(_cosines(item, ctx), ctx.n, offset=item[0])


def _draw_task(item: tuple[int, int], ctx: PartContext) -> tuple[np.ndarray, np.ndarray, np.ndarray, LogSums]:
    """``sample --mode draw``: the partition's top n of ``log w + Gumbel noise`` ``(vec_ids, keys,
    cosines)``, and the partial of its log weights."""
    lo, hi = item
    cos = _cosines(item, ctx)
    log_w = ctx.a * cos
    keys = log_w + gumbel_noise(ctx.seed, lo, hi)
    k = min(ctx.n, hi - lo)
    top = np.argpartition(-keys, k - 1)[:k] if k < hi - lo else np.arange(hi - lo)
    return top + lo, keys[top], cos[top], LogSums.of(log_w)


def _sums_task(item: tuple[int, int], ctx: PartContext) -> LogSums:
    """``sample --mode draw --replace``, first pass: the partial of the partition's log weights."""
    return LogSums.of(ctx.a * _cosines(item, ctx))


def _locate_task(item: tuple[int, int, float, np.ndarray], ctx: PartContext) -> tuple[np.ndarray, np.ndarray]:
    """``sample --mode draw --replace``, second pass: the images at ``targets`` (item[3]) of the
    partition's cumulative weights ``exp(log w - item[2])``: ``(vec_ids, cosines)``."""
    lo, hi, top, targets = item
    cos = _cosines((lo, hi), ctx)
    cum = np.cumsum(np.exp(ctx.a * cos - top))
    idx = np.searchsorted(cum, targets, side="right")
    # rounding can put a target at or past the partition's last sum: its last image of positive weight
    last = int(np.flatnonzero(np.diff(cum, prepend=0.0) > 0)[-1])
    idx = np.minimum(idx, last)
    return idx + lo, cos[idx]


def weights_task(item, ctx):
    return _guarded(_weights_task, item, ctx)


def top_task(item, ctx):
    return _guarded(_top_task, item, ctx)


def draw_task(item, ctx):
    return _guarded(_draw_task, item, ctx)


def sums_task(item, ctx):
    return _guarded(_sums_task, item, ctx)


def locate_task(item, ctx):
    return _guarded(_locate_task, item, ctx)


# -- the driver ----------------------------------------------------------------------------------


def _context(pool: PoolIndex, vector: np.ndarray, a: float, **kw) -> PartContext:
    v = np.asarray(vector, dtype=np.float64)
    return PartContext(root=pool.location, created_at=pool.created_at,
                       vector=v, a=float(a), **kw)


def _run(engine, task: Callable, items: list, ctx: PartContext, key: Callable = lambda item: item) -> dict:
    """``{key(item): result}`` of every item, one result each, the first task error raised."""
    shared = engine.put(ctx)
    got: dict = {}
    for item, result in engine.map(task, items, shared):
        if isinstance(result, Failed):
            raise result.error
        got.setdefault(key(item), result)
    return got


def cosines(engine, pool: PoolIndex, vector: np.ndarray, a: float,
            partition_rows: int | None = None) -> tuple[np.ndarray, LogSums]:
    """Every image's cosine with ``vector`` (float64, by vec_id) and the merged partial of the log
    weights ``a * cos``, from one task per partition."""
    parts = partitions(pool.n, engine.workers, partition_rows)
    got = _run(engine, weights_task, parts, _context(pool, vector, a))
    cos = np.empty(pool.n, dtype=np.float64)
    for lo, hi in parts:
        cos[lo:hi] = got[(lo, hi)][0]
    return cos, merge_sums([got[p][1] for p in parts])


def sample_columns(engine, pool: PoolIndex, vector: np.ndarray, a: float, n: int, *, mode: str, seed: int = 0,
                   replace: bool = False, partition_rows: int | None = None) -> dict[str, np.ndarray]:
    """The columns of ``weighting.sample`` (``vec_id, cosine, weight`` and, for draws,
    ``normalized_weight``), in draw / rank order, from the partitions' parts."""
    parts = partitions(pool.n, engine.workers, partition_rows)
    if mode == "top":
        got = _run(engine, top_task, parts, _context(pool, vector, a, n=n))
        ids = np.concatenate([got[p][0] for p in parts])
        cos = np.concatenate([got[p][1] for p in parts])
        order = np.lexsort((ids, -cos))[:n]
        with np.errstate(over="ignore"):
            return {"vec_id": ids[order].astype(np.int64), "cosine": cos[order], "weight": np.exp(a * cos[order])}
    if replace:
        ids, cos, sums = _draw_replace(engine, pool, vector, a, n, seed, parts)
    else:
        got = _run(engine, draw_task, parts, _context(pool, vector, a, n=n, seed=seed))
        ids = np.concatenate([got[p][0] for p in parts])
        keys = np.concatenate([got[p][1] for p in parts])
        cos = np.concatenate([got[p][2] for p in parts])
        order = np.lexsort((ids, -keys))[:n]
        ids, cos, sums = ids[order], cos[order], merge_sums([got[p][3] for p in parts])
    log_w = a * cos
    with np.errstate(over="ignore"):
        return {"vec_id": ids.astype(np.int64), "cosine": cos, "weight": np.exp(log_w),
                "normalized_weight": np.exp(log_w - sums.log_mean)}


def _draw_replace(engine, pool: PoolIndex, vector: np.ndarray, a: float, n: int, seed: int,
                  parts: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, LogSums]:
    """``n`` draws with replacement, probability proportional to ``w``: the local draw's uniforms
    (``default_rng(seed).random(n)``, what ``Generator.choice`` draws) mapped through the
    partitions' shares of the total weight, then through each partition's cumulative weights."""
    ctx = _context(pool, vector, a)
    got = _run(engine, sums_task, parts, ctx)
    sums = [got[p] for p in parts]
    top = max(s.max for s in sums)
    share = np.array([s.s1 * math.exp(s.max - top) for s in sums])  # sum of exp(log w - top) per partition
    ends = np.cumsum(share)
    targets = np.random.default_rng(seed).random(n) * ends[-1]
    which = np.minimum(np.searchsorted(ends, targets, side="right"), int(np.flatnonzero(share > 0)[-1]))
    items, where = [], {}
    for k in np.unique(which):
        sel = np.flatnonzero(which == k)
        lo, hi = parts[k]
        items.append((lo, hi, top, targets[sel] - (ends[k] - share[k])))
        where[lo] = sel
    found = _run(engine, locate_task, items, ctx, key=lambda item: item[0])
    ids = np.empty(n, dtype=np.int64)
    cos = np.empty(n, dtype=np.float64)
    for lo, sel in where.items():
        ids[sel], cos[sel] = found[lo]
    return ids, cos, merge_sums(sums)

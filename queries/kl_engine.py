"""The KL columns of a score run as tasks on an engine (``indexer.engine``; ``--engine ray``).

The driver (the process that runs ``score``) prepares each side once (``queries.scorers``: the
paper sample, mimps' tail, the strata plan and its calibration), puts those constants in the
engine's object store once, and submits the chunks that the run's work folder does not already
hold. A task opens the index's memory-mapped embeddings itself (read-only: the index lives on a
path every worker can read, or at a URI that each worker's node mirrors), computes its chunk with
the same step as the local engine, and returns the result; only the driver writes (the chunk
files, the running column partials, the catalog), so a chunk retried after a lost worker is
written once and counted once. The work folder is the local
engine's, file for file: a run interrupted on one engine resumes on the other.

The exact pass of both sides splits ``S = a T I'`` into tiles of a chunk of captions by a block of
images (``key_block``): a tile returns its captions' row partials over its images and its images'
column partials over its captions (``queries.exact.Moments``, merged associatively). A chunk is
finished when its last tile is in: its rows are written, and its column partials are folded into the
running partials together (written to their file as ``queries.chunks.RunningColumns`` says), so the
file never holds part of a chunk. When a run has fewer chunks than
the cluster has workers, chunks are split likewise into parts (``TASKS_PER_WORKER``); the chunk files
stay those of the local engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clip_density_index.indexer.faults import fault_point
from clip_density_index.indexer.pool import PoolIndex, task_index
from clip_density_index.indexer.progress import Progress
from clip_density_index.queries import chunks
from clip_density_index.queries.score_params import ScoreParams
from clip_density_index.queries.score_report import ScoreReport
from clip_density_index.queries.scorers import SideJob, bind, cand_sum, finish_side, mean_scores, prepare_side

#: Images per tile of the exact pass of both sides: a task holds one block of images (1M x 512
#: float32: 2 GB) and returns its column partials (24 bytes per image). A multiple of the exact
#: pass's own candidate blocks (``queries.exact.CPU_CHUNKS`` / ``GPU_CHUNKS``).
KEY_BLOCK = 1 << 20
#: Tasks per worker a run aims for when its chunks are fewer: each chunk is then split into parts
#: (queries of one side; images of the exact pass), which the driver assembles before writing it.
TASKS_PER_WORKER = 2
#: The fewest queries or images in a part (a multiple of the exact pass's candidate block).
MIN_PART = 4096


@dataclass(frozen=True)
class TaskContext:
    """What every task of a run receives (put in the object store once)."""

    root: str  # the index's location (PoolIndex.location: a directory or a URI)
    created_at: str
    device: str
    job: SideJob | None = None  # one side's constants (kl_side)
    p: ScoreParams | None = None  # the exact pass of both sides (kl_exact_both)


# -- the tasks (module level: every worker imports them) ----------------------------------------

def side_task(item: tuple[int, int, int], ctx: TaskContext) -> tuple[Any, dict[str, float]]:
    """Queries ``a:b`` of the chunk starting at ``item[0]`` of one side's KL (``item = (chunk, a,
    b)``): ``(ChunkScores, timings)``."""
    _, start, stop = item
    pool, job = task_index(ctx.root, ctx.created_at), ctx.job
    queries = np.asarray(pool.embeddings(job.side, checked=False)[start:stop], dtype=np.float32)
    timings: dict[str, float] = {}
    with bind(job, pool, ctx.device) as step:
        out = step(queries, np.arange(start, stop, dtype=np.int64), timings)
    fault_point("score.task")
    return out, timings


def tile_task(item: tuple[int, int, int, int, bool], ctx: TaskContext) -> tuple[tuple, tuple | None, float]:
    """One tile of the exact pass of both sides: captions ``start:stop`` x images ``c0:c1``;
    returns the captions' row partials, the images' column partials (when ``item[4]``: a chunk
    already folded into the running file needs only its rows) and the seconds it took."""
    from clip_density_index.queries.exact import exact_moments

    start, stop, c0, c1, want_cols = item
    pool, p = task_index(ctx.root, ctx.created_at), ctx.p
    t0 = time.perf_counter()
    rows, cols = exact_moments(pool.embeddings("text", checked=False)[start:stop],
                               pool.embeddings("image", checked=False)[c0:c1], p.a, rows=True, cols=want_cols,
                               device=ctx.device, precision=p.precision)
    fault_point("score.task")
    parts = lambda m: None if m is None else (m.max, m.s0, m.s1)  # noqa: E731
    return parts(rows), parts(cols), time.perf_counter() - t0


# -- the driver ----------------------------------------------------------------------------------


def _context(pool: PoolIndex, device: str, **kw) -> TaskContext:
    return TaskContext(root=pool.location, created_at=pool.created_at,
                       device=device, **kw)


def _resources(device: str) -> dict:
    """A GPU per task where the driver scores on one (each Ray worker then sees its own)."""
    from clip_density_index.indexer.device import resolve_device

    return {"num_gpus": 1} if resolve_device(device).type == "cuda" else {}


def _split(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """``lo..hi`` in at most ``parts`` near-equal ranges of at least ``MIN_PART`` (multiples of it)."""
    size = max(MIN_PART, -(-(hi - lo) // max(1, parts)))
    size = -(-size // MIN_PART) * MIN_PART
    return [(a, min(a + size, hi)) for a in range(lo, hi, size)]


def _parts_per_chunk(engine, chunks_todo: int) -> int:
    """Parts to split each chunk into so that the engine's workers all get tasks."""
    return max(1, -(-TASKS_PER_WORKER * engine.workers // max(1, chunks_todo)))


def kl_side(engine, pool: PoolIndex, side: str, p: ScoreParams, work: Path, report: ScoreReport,
            progress: Progress, device: str) -> None:
    """Every chunk of ``kl_{side}``/``klr_{side}`` in ``work``: reused, or computed by ``engine``
    (in parts of queries when the chunks are fewer than the workers; a chunk is written whole)."""
    n = pool.n
    job = prepare_side(pool, side, p, report, device)
    todo = {}
    for start in range(0, n, p.batch_size):
        stop = min(start + p.batch_size, n)
        if chunks.rows_done(work, side, start, stop):
            report.chunks_reused += 1
        else:
            todo[start] = _Chunk(start, stop)
    split = _parts_per_chunk(engine, len(todo))
    items = []
    for c in todo.values():
        parts = _split(c.start, c.stop, split)
        c.left = len(parts)
        items += [(c.start, a, b) for a, b in parts]
    ctx = engine.put(_context(pool, device, job=job))
    scanned, rows = 0.0, 0
    with progress(f"KL scores ({side} side, {p.estimator}, {engine.name})", n) as advance:
        advance(n - sum(c.stop - c.start for c in todo.values()))
        for (start, a, b), (out, timings) in engine.map(side_task, items, ctx, **_resources(device)):
            for key, seconds in timings.items():
                report.add_seconds(key, seconds)
            scanned, rows = scanned + out.scanned, rows + (b - a)
            chunk = todo[start]
            chunk.pieces.append((a, out))
            chunk.left -= 1
            if chunk.left == 0:
                t0 = time.perf_counter()
                pieces = [o for _, o in sorted(todo.pop(start).pieces, key=lambda x: x[0])]
                chunks.write_rows(work, side, start, np.concatenate([o.kl for o in pieces]),
                                  np.concatenate([o.klr for o in pieces]))
                report.add_seconds(f"kl_{side}.write", time.perf_counter() - t0)
                report.chunks_computed += 1
                advance(chunk.stop - chunk.start)
    finish_side(job, report, scanned, rows)


@dataclass
class _Chunk:
    """A chunk of queries whose parts are coming in."""

    start: int
    stop: int
    left: int = 0  # parts not yet in
    pieces: list = field(default_factory=list)  # one side: (first query, ChunkScores) of each part
    rows: Any = None  # exact both sides: queries.exact.Moments over the chunk's captions
    cols: list = field(default_factory=list)  # exact both sides: (c0, c1, (max, s0, s1)) of each tile


def kl_exact_both(engine, pool: PoolIndex, p: ScoreParams, work: Path, report: ScoreReport, progress: Progress,
                  device: str, column: Callable[[str], np.ndarray], key_block: int | None = None) -> None:
    """Both sides exactly, tile by tile on ``engine`` (see the module's docstring; ``key_block``:
    images per tile, default ``KEY_BLOCK``), into ``column(name)`` arrays; the work folder and the
    columns as ``queries.kl_local.kl_exact_both`` keeps them."""
    from clip_density_index.queries.exact import Moments

    n, key_block = pool.n, int(key_block or KEY_BLOCK)
    report.dots_per_query.update(text=float(n), image=float(n))
    mean_text = mean_scores(pool.embeddings("text"), cand_sum(pool, "image"), p.a, n)
    mean_image = mean_scores(pool.embeddings("image"), cand_sum(pool, "text"), p.a, n)
    columns, merged = chunks.read_columns(work, n)
    open_chunks: dict[int, _Chunk] = {}
    for start in range(0, n, p.batch_size):
        stop = min(start + p.batch_size, n)
        if start in merged and chunks.rows_done(work, "text", start, stop):
            report.chunks_reused += 1
        else:
            open_chunks[start] = _Chunk(start, stop, rows=Moments(stop - start))
    blocks = [(c0, c1) for k0, k1 in _split(0, n, -(-n // key_block))
              for c0, c1 in _split(k0, k1, _parts_per_chunk(engine, len(open_chunks)))]
    tiles = []
    for c in open_chunks.values():
        c.left = len(blocks)
        tiles += [(c.start, c.stop, c0, c1, c.start not in merged) for c0, c1 in blocks]
    ctx = engine.put(_context(pool, device, p=p))
    running = chunks.RunningColumns(work, columns, merged)
    with progress(f"KL scores (both sides, exact, {engine.name})", n) as advance:
        advance(n - sum(c.stop - c.start for c in open_chunks.values()))
        for (start, stop, c0, c1, _), (rows, cols, seconds) in engine.map(tile_task, tiles, ctx,
                                                                        **_resources(device)):
            report.add_seconds("kl_both.exact", seconds)
            chunk = open_chunks[start]
            chunk.rows.merge(slice(None), *rows)
            if cols is not None:
                chunk.cols.append((c0, c1, cols))
            chunk.left -= 1
            if chunk.left == 0:
                _finish_chunk(work, open_chunks.pop(start), mean_text, running, p, n, report)
                advance(stop - start)
    running.save()
    chunks.read_side(work, "text", n, column)
    columns.kl_into(column("kl_image"), column("klr_image"), mean_image, n, p.b)


def _finish_chunk(work: Path, chunk: _Chunk, mean_text: np.ndarray, running: chunks.RunningColumns,
                  p: ScoreParams, n: int, report: ScoreReport) -> None:
    """A chunk whose tiles are all in: its rows written, its column partials folded in (once)."""
    t0 = time.perf_counter()
    kl, klr = chunk.rows.kl(mean_text[chunk.start : chunk.stop], n, p.b)
    chunks.write_rows(work, "text", chunk.start, kl, klr)
    if chunk.cols:
        for c0, c1, parts in chunk.cols:
            running.columns.merge(slice(c0, c1), *parts)
        running.folded(chunk.start)
    report.add_seconds("kl_both.write", time.perf_counter() - t0)
    report.chunks_computed += 1

"""The KL columns of a score run in this process, chunk by chunk, resumable (the local engine).

``kl_side`` computes one side's chunks with any estimator (``queries.scorers``); ``kl_exact_both``
computes both sides exactly from one pass over ``S = a T I'``. Every finished chunk is written to the
run's work folder (``queries.chunks``) before the next starts, and a rerun reuses it.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

import numpy as np

from clip_density_index.indexer.pool import PoolIndex
from clip_density_index.indexer.progress import Progress
from clip_density_index.queries import chunks
from clip_density_index.queries.score_params import ScoreParams
from clip_density_index.queries.score_report import ScoreReport
from clip_density_index.queries.scorers import bind, cand_sum, finish_side, mean_scores, prepare_side


def kl_side(pool: PoolIndex, side: str, p: ScoreParams, work: Path, report: ScoreReport,
            progress: Progress, device: str) -> None:
    """Compute (or reuse) every chunk of ``kl_{side}``/``klr_{side}`` as parquet files in ``work``."""
    n = pool.n
    queries = pool.embeddings(side)
    job = prepare_side(pool, side, p, report, device)
    scanned, rows = 0.0, 0
    with bind(job, pool, device) as step, progress(f"KL scores ({side} side, {p.estimator})", n) as advance:
        for start in range(0, n, p.batch_size):
            stop = min(start + p.batch_size, n)
            if chunks.rows_done(work, side, start, stop):
                report.chunks_reused += 1
            else:
                ids = np.arange(start, stop, dtype=np.int64)
                out = step(np.asarray(queries[start:stop], dtype=np.float32), ids, report.seconds)
                scanned, rows = scanned + out.scanned, rows + len(ids)
                t0 = time.perf_counter()
                chunks.write_rows(work, side, start, out.kl, out.klr)
                report.add_seconds(f"kl_{side}.write", time.perf_counter() - t0)
                report.chunks_computed += 1
            advance(stop - start)
    finish_side(job, report, scanned, rows)


def kl_exact_both(pool: PoolIndex, p: ScoreParams, work: Path, report: ScoreReport, progress: Progress,
                  device: str, column: Callable[[str], np.ndarray]) -> None:
    """Both sides exactly from one pass over ``S = a T I'`` (``queries.exact.exact_moments``), into
    ``column(name)`` arrays (the run's column files, ``queries.columns.Columns.new``).

    Resumable like the one-sided chunks: chunk ``c`` (captions ``start..stop``) writes the captions'
    finished kl_text / klr_text, then folds the images' column partials over those captions into
    one running file (``chunks.COLUMNS_FILE``, O(n) on disk whatever the number of chunks) that
    records which chunks it holds; the file is written every ``chunks.COLUMNS_EVERY`` seconds and
    at the end of the pass (``chunks.RunningColumns``). A chunk counts as done when its rows file
    exists and the written partials hold it; a crash in between recomputes the chunk and folds it
    in once.
    The partials (24 bytes per image) stay in memory for the pass; kl_image / klr_image are
    computed from them block by block into their column files.
    """
    from clip_density_index.indexer.device import resolve_device
    from clip_density_index.queries.exact import exact_moments, stage

    n = pool.n
    texts, images = pool.embeddings("text"), pool.embeddings("image")
    gpu = resolve_device(device)
    if gpu.type == "cuda":  # the images once on the GPU, not once per chunk of captions
        images = stage(images, gpu, p.precision)
    report.dots_per_query.update(text=float(n), image=float(n))
    mean_text = mean_scores(texts, cand_sum(pool, "image"), p.a, n)
    mean_image = mean_scores(pool.embeddings("image"), cand_sum(pool, "text"), p.a, n)
    columns, merged = chunks.read_columns(work, n)
    running = chunks.RunningColumns(work, columns, merged)
    with progress("KL scores (both sides, exact)", n) as advance:
        for start in range(0, n, p.batch_size):
            stop = min(start + p.batch_size, n)
            if start in merged and chunks.rows_done(work, "text", start, stop):
                report.chunks_reused += 1
                advance(stop - start)
                continue
            t0 = time.perf_counter()
            rows, cols = exact_moments(texts[start:stop], images, p.a, rows=True, cols=start not in merged,
                                       device=device, precision=p.precision,
                                       progress=lambda label, total: _forward(advance))
            kl, klr = rows.kl(mean_text[start:stop], n, p.b)
            report.add_seconds("kl_both.exact", time.perf_counter() - t0)
            t0 = time.perf_counter()
            chunks.write_rows(work, "text", start, kl, klr)
            if cols is not None:
                columns.merge_all(cols)
                running.folded(start)
            report.add_seconds("kl_both.write", time.perf_counter() - t0)
            report.chunks_computed += 1
    running.save()
    chunks.read_side(work, "text", n, column)
    columns.kl_into(column("kl_image"), column("klr_image"), mean_image, n, p.b)


@contextlib.contextmanager
def _forward(advance: Callable[[int], None]):
    yield advance

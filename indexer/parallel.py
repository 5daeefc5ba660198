"""The build's work as engine tasks (``indexer.engine``): a source read in parts, FAISS lists filled
by row ranges. ``indexer.build`` is the driver: it takes the results in pool order and writes
everything that is stored.

Reading: a source that can be split (``parts()`` / ``read_part()``, see ``indexer.source.Part``:
the synthetic world by blocks, DataComp and clip-retrieval by shard, open_clip by slices of its
listing) is read by ``read_part`` tasks. Each validates and normalises its rows and accumulates
their statistics, its covariance rows drawn where the part sits in the pool
(``stats.cov_rows_at``), and returns all of it; the driver merges the statistics in pool order
(sums and second moments are additive). A task writes nothing, so a task retried after its worker
was lost leaves nothing behind twice. A source that encodes with a model (``encodes``: open_clip)
has its parts read on the engine's actors instead (``engine.map_actors``: on Ray, a pool of Ray Data
actors, one GPU each where the cluster has GPUs), each of which receives the source, and its model,
once and reads every part it is given with it.

FAISS: the driver trains the index on a sample (``faiss_index.train_index``); ``fill_lists`` tasks
add row ranges of the written embeddings to copies of it; the driver merges the copies' inverted
lists in row order, which gives the lists of one index filled in that order. The workers read the
embeddings from the build's temporary directory and the inputs from their paths: on a cluster of
several machines, the inputs and ``--out`` must be on a filesystem every machine mounts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from clip_density_index.indexer.errors import BadInput, ClipIndexError
from clip_density_index.indexer.layout import MODALITIES
from clip_density_index.indexer.normalise import normalise_rows
from clip_density_index.indexer.progress import Progress
from clip_density_index.indexer.source import Part
from clip_density_index.indexer.stats import StatsAccumulator, cov_rows_at
from clip_density_index.indexer.validate import validate_batch

logger = logging.getLogger(__name__)

#: Rows of the embeddings one ``fill_lists`` task adds to its copy of the FAISS index.
FILL_ROWS = 1 << 18


def can_split(source: Any) -> bool:
    """Whether ``source`` can be read in parts (``indexer.source.Part``)."""
    return callable(getattr(source, "parts", None)) and callable(getattr(source, "read_part", None))


@dataclass(frozen=True)
class ReadSettings:
    """What a ``read_part`` task needs besides its part and the source."""

    dim: int
    n: int  # rows the source announced: the covariance subset is drawn over them
    raw: bool  # the source's vectors are raw model outputs: their norms are kept
    check_uids: bool
    batch_size: int
    cov_sample: int
    seed: int


@dataclass
class PartRead:
    """What ``read_part`` returns: a part's rows, normalised, and their statistics."""

    part: Part
    meta: pa.Table | None  # the rows' metadata (uid, caption, ...), None when every row was skipped
    vectors: dict[str, np.ndarray]  # modality -> (rows, dim) float32 unit rows
    norms: dict[str, np.ndarray]  # modality -> (rows,) float32 raw norms
    segments: list[tuple[int, str, int]]  # (first row within the part, origin, row offset in origin)
    stats: dict[str, StatsAccumulator]
    skipped: list[tuple[str, str]]  # (path, reason) of the samples the part skipped

    @property
    def rows(self) -> int:
        return 0 if self.meta is None else self.meta.num_rows

    def head(self, rows: int) -> "PartRead":
        """The first ``rows`` rows (statistics to be recomputed)."""
        return replace(self, meta=self.meta.slice(0, rows), vectors={m: v[:rows] for m, v in self.vectors.items()},
                       norms={m: v[:rows] for m, v in self.norms.items()},
                       segments=[s for s in self.segments if s[0] < rows])


def read_part(part: Part, shared: tuple[Any, ReadSettings]) -> PartRead:
    """Task: read one part of the source, validate and normalise its rows, accumulate their
    statistics (as if the part starts at pool row ``part.start``)."""
    source, settings = shared
    metas, segments, rows = [], [], 0
    vectors: dict[str, list] = {m: [] for m in MODALITIES}
    norms: dict[str, list] = {m: [] for m in MODALITIES}
    for batch in source.read_part(part, settings.batch_size):
        validate_batch(batch, settings.dim, check_uids=settings.check_uids)
        b = batch.meta.num_rows
        for m, arr in (("image", batch.image), ("text", batch.text)):
            out = np.empty((b, settings.dim), np.float32)
            norms[m].append(normalise_rows(batch, m, arr, out))
            vectors[m].append(out)
        metas.append(batch.meta)
        segments.append((rows, batch.origin, batch.row_offset))
        rows += b
        if rows > part.rows:
            raise BadInput(f"{batch.origin}: source yielded more than the {part.rows} rows it listed there")
    empty = np.zeros((0, settings.dim), np.float32)
    result = PartRead(
        part=part, meta=pa.concat_tables(metas) if metas else None,
        vectors={m: np.concatenate(v) if v else empty for m, v in vectors.items()},
        norms={m: np.concatenate(v) if v else np.zeros(0, np.float32) for m, v in norms.items()},
        segments=segments, stats={}, skipped=list(getattr(source, "skipped", []) or []),
    )
    result.stats = part_statistics(result, settings, part.start)
    return result


def part_statistics(read: PartRead, settings: ReadSettings, start: int) -> dict[str, StatsAccumulator]:
    """The statistics of a part's rows when they are pool rows ``[start, start + rows)``."""
    cov_rows = cov_rows_at(settings.n, settings.cov_sample, settings.seed, start, read.rows)
    stats = {}
    for m in MODALITIES:
        acc = StatsAccumulator(settings.dim, raw=settings.raw, precision="float32")
        acc.update(read.vectors[m], read.norms[m] if settings.raw else None, cov_rows=cov_rows)
        stats[m] = acc
    return stats


def parts_in_order(engine: Any, source: Any, parts: list[Part], settings: ReadSettings,
                   limit: int) -> Iterator[PartRead]:
    """Read ``parts`` of ``source`` on ``engine``; yield them in pool order, ``limit`` rows in all
    (the last part cut). A part that does not start where it was listed (samples skipped before it)
    or that is cut has its statistics recomputed here, so they are those of its rows in the pool.

    Parts are read in rounds: a round is the parts that list the rows still wanted; a source that
    skips unreadable samples may need another round."""
    shared = engine.put((source, settings))
    done, taken = 0, 0
    while done < limit and taken < len(parts):
        round_, listed = [], 0
        while taken < len(parts) and listed < limit - done:
            round_.append(parts[taken])
            listed += parts[taken].rows
            taken += 1
        waiting: dict[int, PartRead] = {}
        expect = round_[0].index
        for part, read in run_tasks(engine, read_part, round_, shared, actors=getattr(source, "encodes", False)):
            waiting[part.index] = read
            while expect in waiting and done < limit:
                read = waiting.pop(expect)
                expect += 1
                cut = read.rows > limit - done
                if cut:
                    read = read.head(limit - done)
                if cut or read.part.start != done:
                    read.stats = part_statistics(read, settings, done)
                done += read.rows
                yield read
            if done >= limit:
                return


def run_tasks(engine: Any, task: Callable[[Any, Any], Any], items: Iterable[Any], shared: Any = None, *,
              actors: bool = False) -> Iterator[tuple[Any, Any]]:
    """``engine.map`` (``actors``: ``engine.map_actors``, one GPU per actor where the cluster has
    GPUs), with a domain error raised on a worker raised here as itself (Ray wraps it with the
    worker's traceback)."""
    try:
        if actors:
            yield from engine.map_actors(task, items, shared, gpus=True)
        else:
            yield from engine.map(task, items, shared)
    except Exception as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, ClipIndexError) and cause is not e:
            raise cause from None
        raise


# -- FAISS ------------------------------------------------------------------------------------------
def fill_lists(rows: tuple[int, int], shared: tuple[np.ndarray, str]) -> np.ndarray:
    """Task: add rows ``[lo, hi)`` of the embeddings file to a copy of the trained index; return
    that copy, serialised."""
    from clip_density_index.indexer import faiss_index

    (lo, hi), (trained, path) = rows, shared
    if not Path(path).is_file():
        raise BadInput(f"{path} is not visible on this worker: on a cluster of several machines, --out must "
                       "be on a filesystem every machine mounts")
    index = faiss_index.deserialize(trained)
    emb = np.load(path, mmap_mode="r")
    faiss_index.add_vectors(index, emb, start=lo, stop=hi, use_gpu=False)
    return faiss_index.serialize(index)


def build_faiss(engine: Any, key: str, path: Path, *, seed: int, use_gpu: bool | None, progress: Progress,
                label: str) -> Any:
    """A FAISS index over the embeddings file ``path``: trained here, its lists filled by
    ``fill_lists`` tasks and merged in row order (indexes without lists: filled here)."""
    from clip_density_index.indexer import faiss_index

    emb = np.load(path, mmap_mode="r")
    n = emb.shape[0]
    index = faiss_index.train_index(key, emb, seed=seed, use_gpu=use_gpu)
    if not faiss_index.can_merge_lists(index):
        return faiss_index.add_vectors(index, emb, use_gpu=use_gpu, progress=progress, label=label)
    del emb
    shared = engine.put((faiss_index.serialize(index), str(path)))
    ranges = [(lo, min(lo + FILL_ROWS, n)) for lo in range(0, n, FILL_ROWS)]
    waiting: dict[int, tuple[int, np.ndarray]] = {}
    at = 0
    with progress(label, n) as advance:
        for (lo, hi), data in run_tasks(engine, fill_lists, ranges, shared):
            waiting[lo] = (hi, data)
            while at in waiting:  # merged in row order: the lists of one index filled in order
                hi, data = waiting.pop(at)
                faiss_index.merge_lists(index, faiss_index.deserialize(data))
                advance(hi - at)
                at = hi
    return index

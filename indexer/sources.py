"""Make a ``Source`` from the build-index options (one place that knows every source)."""

from __future__ import annotations

from pathlib import Path

from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.indexer.progress import Progress

DEFAULT_SYNTHETIC_N = 100_000
DEFAULT_LOGIT_SCALE = 100.0


def make_source(
    kind: str,
    input_path: Path | None = None,
    *,
    n: int | None = None,
    arch: str = "b32",
    logit_scale: float | None = None,
    model: str = "ViT-B-32",
    pretrained: str | None = None,
    captions: Path | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    uid_column: str | None = None,
    skip_bad: bool = False,
    device: str = "auto",
    workers: int | None = None,
    seed: int = 0,
    dim: int = 512,
    geometry: str = "calibrated",
    progress: Progress | None = None,
):
    """Return the source named ``kind`` ("synthetic", "open_clip", "datacomp", "clip-retrieval")."""
    if kind == "synthetic":
        from clip_density_index.indexer import memory
        from clip_density_index.indexer.synthetic import SyntheticSource

        n = n or DEFAULT_SYNTHETIC_N
        if isinstance(dim, int) and not isinstance(dim, bool) and isinstance(n, int) and dim > 0 and n > 0:
            memory.check(memory.build_bytes(n, dim), f"build-index --dim {dim:,} --n {n:,}",
                         "CLIP-like models have dimensions of a few hundred to ~1,000 (e.g. --dim 512)")
        return SyntheticSource(n=n, seed=seed, dim=dim, geometry=geometry)
    if input_path is None:
        raise InvalidParameter(f"source {kind!r} needs an input path")
    if kind == "datacomp":
        from clip_density_index.indexer.reader import DataCompSource

        return DataCompSource(input_path, arch=arch, logit_scale=logit_scale or DEFAULT_LOGIT_SCALE)
    if kind == "clip-retrieval":
        from clip_density_index.indexer.reader import ClipRetrievalSource

        return ClipRetrievalSource(input_path, logit_scale=logit_scale or DEFAULT_LOGIT_SCALE,
                                   caption_column=caption_column, uid_column=uid_column)
    if kind == "open_clip":
        from clip_density_index.indexer.embed import OpenClipSource
        from clip_density_index.indexer import fs

        if fs.is_uri(input_path) and not str(input_path).startswith("file://"):
            raise InvalidParameter(f"--input {input_path}: the open_clip source reads a local image folder "
                                   "or .tar shards; URIs are read by --source datacomp and clip-retrieval")
        images = fs.input_path(input_path)
        return OpenClipSource(
            images=images, captions=captions, model=model, pretrained=pretrained,
            image_column=image_column, caption_column=caption_column, uid_column=uid_column,
            num_workers=workers, device=device, skip_bad=skip_bad, progress=progress,
        )
    raise InvalidParameter(f"unknown source {kind!r}; choose one of synthetic, open_clip, datacomp, clip-retrieval")


class ArraySource:
    """A pool held in memory as numpy arrays (for the Python API and tests).

    Args:
        image: (n, d) image embeddings (raw when ``raw_known``, else normalised).
        text: (n, d) text embeddings.
        captions: n captions (default "sample {i}").
        uids: n uids of 32 hex digits (default: md5 of the row number).
        meta: extra metadata columns (a pyarrow Table or a dict of columns), kept in ``samples``.
        logit_scale: the model's a.
        logit_bias: SigLIP bias b, if any.
        raw_known: whether the vectors are raw model outputs (their norms are kept).
        name: the ``source`` recorded in the manifest.
    """

    def __init__(self, image, text, *, captions=None, uids=None, meta=None, logit_scale: float = 100.0,
                 logit_bias: float | None = None, raw_known: bool = True, name: str = "arrays",
                 model: str | None = None):
        import hashlib

        import numpy as np
        import pyarrow as pa

        from clip_density_index.indexer.reader import RESERVED_COLUMNS
        from clip_density_index.indexer.source import SourceInfo

        self.image = np.asarray(image)
        self.text = np.asarray(text)
        if self.image.ndim != 2 or self.text.ndim != 2:
            raise InvalidParameter(f"image and text must be 2-D arrays, got {self.image.shape} and {self.text.shape}")
        n = self.image.shape[0]
        if uids is None:
            uids = [hashlib.md5(str(i).encode()).hexdigest() for i in range(n)]
        if captions is None:
            captions = [f"sample {i}" for i in range(n)]
        cols = {"uid": pa.array(list(uids), pa.string()), "caption": pa.array(list(captions), pa.string())}
        if meta is not None:
            extra = meta if isinstance(meta, pa.Table) else pa.table(meta)
            for name_ in extra.column_names:  # a column the index names itself is kept as NAME_source
                cols[f"{name_}_source" if name_.lower() in RESERVED_COLUMNS else name_] = extra.column(name_)
        self.meta = pa.table(cols)
        self.info = SourceInfo(source=name, n=n, dim=self.image.shape[1], raw_known=raw_known,
                               logit_scale=logit_scale, logit_bias=logit_bias, model=model)

    def batches(self, batch_size: int):
        from clip_density_index.indexer.source import Batch

        n = self.info.n
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yield Batch(self.meta.slice(start, stop - start), self.image[start:stop], self.text[start:stop],
                        origin="arrays", row_offset=start)

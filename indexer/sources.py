"""The sources a pool is built from, in one registry, and ``ArraySource`` (numpy arrays in memory).

``SOURCES`` names each source, what its input is, the options it reads and how it is made. The
command line's ``--source`` choice and help, its check of per-source options, ``make_source`` and
every message that lists sources read it; a new source is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from clip_density_index.indexer import defaults
from clip_density_index.indexer.errors import InvalidParameter, ParameterClash
from clip_density_index.indexer.progress import Progress

#: The ``pretrained`` value that asks an open_clip source for untrained weights (tests only).
RANDOM_WEIGHTS = "random"

#: Every option a source may read, with the value ``make_source`` gives it when none is given.
OPTION_DEFAULTS = {
    "arch": defaults.DATACOMP_ARCH,
    "logit_scale": defaults.LOGIT_SCALE,
    "model": defaults.OPEN_CLIP_MODEL,
    "pretrained": None,
    "captions": None,
    "image_column": defaults.IMAGE_COLUMN,
    "caption_column": defaults.CAPTION_COLUMN,
    "uid_column": None,
    "skip_bad": False,
    "device": defaults.DEVICE,
    "workers": None,
    "dim": defaults.SYNTHETIC_DIM,
    "geometry": defaults.SYNTHETIC_GEOMETRY,
}
#: Other forms of an option, checked as the option they set (the command line's
#: ``--log-logit-scale`` gives ``logit_scale`` as its log).
ALIASES = {"log_logit_scale": "logit_scale"}


@dataclass(frozen=True)
class SourceKind:
    """One kind of source.

    Attributes:
        name: its ``source`` name (``--source``).
        input: what ``input_path`` names for it; None when it reads no input.
        options: the options of ``OPTION_DEFAULTS`` it reads.
        required: options it cannot do without, each with what to give (for the message).
        open: ``open(input_path, n, seed, progress, **options)`` -> the source.
        uris: whether ``input_path`` may be a URI read through fsspec (``indexer/fs.py``).
    """

    name: str
    input: str | None
    options: tuple[str, ...]
    open: Callable[..., object]
    required: tuple[tuple[str, str], ...] = ()
    uris: bool = False

    @property
    def generated(self) -> bool:
        """Whether the source makes its pool (of ``n`` samples) instead of reading one."""
        return self.input is None


def _synthetic(input_path, n, seed, progress, *, dim, geometry):
    from clip_density_index.indexer import memory
    from clip_density_index.indexer.synthetic import SyntheticSource

    n = n or defaults.SYNTHETIC_N
    if isinstance(dim, int) and not isinstance(dim, bool) and isinstance(n, int) and dim > 0 and n > 0:
        memory.check(memory.build_bytes(n, dim), f"build-index --dim {dim:,} --n {n:,}",
                     "CLIP-like models have dimensions of a few hundred to ~1,000 "
                     f"(e.g. --dim {defaults.SYNTHETIC_DIM})")
    return SyntheticSource(n=n, seed=seed, dim=dim, geometry=geometry)


def _datacomp(input_path, n, seed, progress, *, arch, logit_scale):
    from clip_density_index.indexer.reader import DataCompSource

    return DataCompSource(input_path, arch=arch, logit_scale=logit_scale)


def _clip_retrieval(input_path, n, seed, progress, *, logit_scale, caption_column, uid_column):
    from clip_density_index.indexer.reader import ClipRetrievalSource

    return ClipRetrievalSource(input_path, logit_scale=logit_scale, caption_column=caption_column,
                               uid_column=uid_column)


def _open_clip(input_path, n, seed, progress, *, model, pretrained, captions, image_column, caption_column,
               uid_column, skip_bad, device, workers):
    from clip_density_index.indexer import fs
    from clip_density_index.indexer.embed import OpenClipSource

    return OpenClipSource(
        images=fs.input_path(input_path), captions=captions, model=model,
        pretrained=None if pretrained == RANDOM_WEIGHTS else pretrained,
        image_column=image_column, caption_column=caption_column, uid_column=uid_column,
        num_workers=workers, device=device, skip_bad=skip_bad, progress=progress,
    )


#: Every source, by name, in the order the command line lists them.
SOURCES: dict[str, SourceKind] = {k.name: k for k in (
    SourceKind("synthetic", None, ("dim", "geometry"), _synthetic),
    SourceKind("open_clip", "a local image folder / .tar shard(s)",
               ("model", "pretrained", "captions", "image_column", "caption_column", "uid_column", "skip_bad",
                "device", "workers"), _open_clip,
               required=(("pretrained", "a tag such as laion2b_s34b_b79k or a checkpoint file "
                                        f"('{RANDOM_WEIGHTS}' for untrained weights)"),)),
    SourceKind("datacomp", "DataComp metadata dir", ("arch", "logit_scale"), _datacomp, uris=True),
    SourceKind("clip-retrieval", "clip-retrieval embeddings dir", ("logit_scale", "caption_column", "uid_column"),
               _clip_retrieval, uris=True),
)}


def source_kind(source: str) -> SourceKind:
    """The registry entry of ``source``.

    Raises:
        InvalidParameter: an unknown name (the message lists the sources).
    """
    try:
        return SOURCES[source]
    except (KeyError, TypeError):
        raise InvalidParameter.naming("unknown {source} {name!r}; choose one of {known}", name=source,
                                      known=", ".join(SOURCES)) from None


def check_options(source: str, given: Iterable[str]) -> SourceKind:
    """Refuse an option that ``source`` does not read (rather than ignore it).

    Args:
        given: the names of the options the caller gave (``OPTION_DEFAULTS`` keys or ``ALIASES``).

    Raises:
        ParameterClash: the first given option the source does not read, naming the sources that do.
        InvalidParameter: an unknown source or option.
    """
    kind = source_kind(source)
    for name in given:
        option = ALIASES.get(name, name)
        if option not in OPTION_DEFAULTS:
            raise InvalidParameter(f"unknown source option {name!r}; sources read {', '.join(OPTION_DEFAULTS)}")
        if option not in kind.options:
            readers = " / ".join(k.name for k in SOURCES.values() if option in k.options)
            raise ParameterClash.naming("{%s} applies only to {source} {readers}, not {chosen}" % name,
                                        readers=readers, chosen=source)
    return kind


def check_required(source: str, input_path: Path | None, options: dict) -> SourceKind:
    """Refuse a source without an option it needs, or with an input it does not read.

    Raises:
        ParameterClash: ``pretrained`` missing for open_clip; ``input_path`` missing for a source
            that reads one, or given to the synthetic world.
    """
    from clip_density_index.indexer import fs

    kind = source_kind(source)
    if input_path is not None and not kind.uris and fs.is_uri(input_path) \
            and not str(input_path).startswith("file://"):
        readers = " and ".join(k.name for k in SOURCES.values() if k.uris)
        raise InvalidParameter(f"--input {input_path}: the {source} source reads {kind.input}; URIs are read by "
                               f"--source {readers}")
    for name, what in kind.required:
        if options.get(name) is None:
            raise ParameterClash.naming("{%s} is required with {source} {chosen}: {what}" % name, chosen=source,
                                        what=what)
    if kind.input is not None and input_path is None:
        raise ParameterClash.naming("{input_path} is required with {source} {chosen}", chosen=source)
    if kind.input is None and input_path is not None:
        raise ParameterClash.naming("{input_path} cannot be used with {source} {chosen}", chosen=source)
    return kind


def make_source(source: str, input_path: Path | str | None = None, *, n: int | None = None, seed: int = defaults.SEED,
                progress: Progress | None = None, **options):
    """The source named ``source`` (a key of ``SOURCES``), reading ``input_path``.

    Args:
        n: the synthetic world's size (default ``defaults.SYNTHETIC_N``); other sources ignore it
            (``build_index(limit=...)`` keeps their first samples).
        seed: the synthetic world's seed.
        progress: progress hook of an open_clip source's encoding.
        options: the options the source reads (``SOURCES[source].options``), e.g. ``arch="l14"``
            for datacomp, ``pretrained=...`` for open_clip (required; ``"random"``: untrained
            weights); the rest default to ``OPTION_DEFAULTS``.

    Raises:
        ParameterClash: an option the source does not read, a required one missing, an input
            missing or not wanted.
        InvalidParameter: an unknown source or option; ClipIndexError from the source itself.
    """
    kind = check_options(source, options)
    aliased = [name for name in options if name in ALIASES]
    if aliased:
        raise InvalidParameter(f"make_source takes {ALIASES[aliased[0]]!r}, not {aliased[0]!r}")
    check_required(source, input_path, options)
    values = {name: options.get(name, OPTION_DEFAULTS[name]) for name in kind.options}
    if "logit_scale" in values and values["logit_scale"] is None:
        values["logit_scale"] = defaults.LOGIT_SCALE
    return kind.open(input_path, n, seed, progress, **values)


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

    def __init__(self, image, text, *, captions=None, uids=None, meta=None, logit_scale: float = defaults.LOGIT_SCALE,
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

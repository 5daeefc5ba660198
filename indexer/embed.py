"""Encode an image-caption pool with an open_clip model: ``load_model`` + ``OpenClipSource``.

Inputs are either

* an image folder plus a captions file (CSV, TSV, JSONL or parquet) whose ``image_column`` holds
  each image's path relative to the folder and ``caption_column`` its caption; or
* webdataset ``.tar`` shards (one ``.tar`` or a directory of them): members are grouped by key
  (the member path up to the first dot of its file name), the image is the ``jpg``/``jpeg``/
  ``png``/``webp`` member, the caption the ``txt`` member, and an optional ``json`` member is kept
  as metadata. Shards are read with the standard library (random access by member offset).

Embeddings are the RAW model outputs (``encode_image`` / ``encode_text`` without normalisation),
so ``SourceInfo.raw_known`` is True and the builder keeps their norms.

torch, torchvision, PIL and open_clip are imported inside functions so that importing this module
(and ``--help``) stays fast.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import posixpath
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa

from clip_density_index.indexer.device import resolve_device
from clip_density_index.indexer.errors import BadInput, InvalidParameter
from clip_density_index.indexer.progress import Progress, null_progress
from clip_density_index.indexer.reader import UidDeriver, arrange_meta, natural_key, normalize_uids
from clip_density_index.indexer.source import Batch, Part, SourceInfo

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order inside a webdataset sample
CAPTION_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl",
                    ".ndjson": "jsonl", ".parquet": "parquet"}
_MAX_SKIP_WARNINGS = 20  # per-sample warnings before switching to DEBUG (a summary follows)
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
#: Samples per part of a Ray build (``OpenClipSource.parts``, rounded up to whole batches): a lost
#: actor re-encodes at most this many.
PART_SAMPLES = 4096


class ModelBundle(NamedTuple):
    """What ``load_model`` returns: unpack as ``model, preprocess, tokenizer = load_model(...)``."""

    model: Any  # open_clip CLIP / CustomTextCLIP in eval mode
    preprocess: Callable  # PIL image -> (3, H, W) float tensor
    tokenizer: Callable  # list[str] -> (n, context_length) int tensor


# --------------------------------------------------------------------------------------------------
# Model loading and encoding
# --------------------------------------------------------------------------------------------------


def load_model(model_name: str, pretrained: str | None, device: str = "auto") -> ModelBundle:
    """Load an open_clip model, its inference preprocessing and its tokenizer.

    Args:
        model_name: an open_clip architecture (``"ViT-B-32"``; ``"ViT-B/32"`` is accepted) or an
            ``hf-hub:``/``local-dir:`` model, for which ``pretrained`` is ignored.
        pretrained: a pretrained tag (``"laion2b_s34b_b79k"``, see
            ``open_clip.list_pretrained_tags_by_model``), a local checkpoint file (a state dict as
            saved by ``torch.save(model.state_dict(), path)``), or None for random weights (tests
            and experiments only; a warning is logged).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...

    Returns:
        ``ModelBundle(model, preprocess, tokenizer)``, the model in eval mode on ``device``.

    Raises:
        InvalidParameter: unknown model name (the message lists some known ones) or unknown
            pretrained tag (listing the model's tags).
        BadInput: the checkpoint file does not exist, cannot be loaded, or does not fit the
            architecture; or the tag's weights cannot be downloaded.
    """
    import open_clip

    device = resolve_device(device)
    schema = model_name.split(":", 1)[0] if model_name.startswith(("hf-hub:", "local-dir:")) else None
    if schema is None:
        model_name = _known_model(model_name)
        if pretrained is not None:
            pretrained = _known_weights(model_name, pretrained)
    try:
        if pretrained is None and schema is None:
            logger.warning("No pretrained weights given for %s: the model is randomly initialised",
                           model_name)
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, device=device)
        else:
            model, preprocess = open_clip.create_model_from_pretrained(model_name, pretrained,
                                                                       device=device)
    except Exception as exc:  # noqa: BLE001 - open_clip raises many types for a bad checkpoint
        raise _load_error(model_name, pretrained, exc) from exc
    model.eval()
    try:
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as exc:  # noqa: BLE001 - e.g. an HF tokenizer that needs transformers
        raise BadInput(f"Cannot load the tokenizer of {model_name}: {type(exc).__name__}: {exc}") from exc
    logger.info("Loaded open_clip %s (pretrained=%s) on %s", model_name, pretrained, device)
    return ModelBundle(model, preprocess, tokenizer)


def _known_model(model_name: str) -> str:
    """open_clip's name of an architecture (``ViT-B/32`` -> ``ViT-B-32``), or InvalidParameter
    listing some known ones."""
    import open_clip

    name = model_name.replace("/", "-")
    known = open_clip.list_models()
    if name not in known:
        close = [m for m in known if m.lower().startswith(name.lower()[:5])][:10]
        examples = close or [m for m in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14",
                                         "ViT-SO400M-14-SigLIP", "RN50") if m in known]
        raise InvalidParameter(f"Unknown open_clip model {model_name!r}; known models include: "
                               f"{', '.join(examples)} ({len(known)} in all, see "
                               f"open_clip.list_models())")
    return name


def _known_weights(model_name: str, pretrained: str) -> str:
    """A pretrained tag of ``model_name``, or the path of an existing checkpoint file; else
    BadInput (a path that is not a file) or InvalidParameter (listing the model's tags)."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained in tags:
        return pretrained
    looks_like_path = (os.sep in pretrained or "/" in pretrained
                       or pretrained.lower().endswith(_CHECKPOINT_SUFFIXES))
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path)
    if path.exists():
        raise BadInput(f"Checkpoint {path} is not a file")
    if looks_like_path:
        raise BadInput(f"Checkpoint file {path} does not exist")
    raise InvalidParameter(f"Unknown pretrained tag {pretrained!r} for {model_name} and no such checkpoint "
                           f"file; known tags: {', '.join(tags) or 'none'}")


def _load_error(model_name: str, pretrained: str | None, exc: Exception) -> BadInput:
    """The one line naming a model whose weights open_clip could not load."""
    detail = " ".join(str(exc).split())
    detail = detail if len(detail) <= 300 else detail[:299] + "…"
    hint = ""
    if pretrained is not None and Path(pretrained).is_file():
        hint = (f" (is it a state dict of {model_name}, as saved by torch.save(model.state_dict(), "
                "path), or an open_clip / OpenAI checkpoint of that architecture?)")
    return BadInput(f"Cannot load {model_name} with pretrained={pretrained!r}: "
                    f"{type(exc).__name__}: {detail}{hint}")


def _pretrained_label(pretrained: str | None) -> str | None:
    """What to record for ``pretrained``: the tag, or the absolute path of a checkpoint file."""
    if pretrained is None:
        return "random (untrained weights)"
    path = Path(pretrained).expanduser()
    return str(path.resolve()) if path.is_file() else str(pretrained)


def _model_device(model) -> Any:
    return next(model.parameters()).device


def _autocast(device) -> contextlib.AbstractContextManager:
    import torch

    if device.type == "cuda":
        return torch.autocast(device_type="cuda")
    return contextlib.nullcontext()


def _encode(model, *, pixels=None, tokens=None) -> np.ndarray:
    """Raw (unnormalised) embeddings of a batch of preprocessed images or of tokens, float32."""
    import torch

    device = _model_device(model)
    with torch.inference_mode(), _autocast(device):
        if pixels is not None:
            out = model.encode_image(pixels.to(device, non_blocking=True))
        else:
            out = model.encode_text(tokens.to(device, non_blocking=True))
    return out.float().cpu().numpy()


def encode_texts(model_bundle: ModelBundle, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Raw (unnormalised) text embeddings, e.g. of a domain prompt for importance weights.

    Args:
        model_bundle: what ``load_model`` returned (the index's model).
        texts: the strings to encode.
        batch_size: texts per forward pass.

    Returns:
        ``(len(texts), dim)`` float32 array.
    """
    model, _, tokenizer = model_bundle
    texts = [str(t) for t in texts]
    if not texts:
        raise InvalidParameter("encode_texts needs at least one text")
    parts = [_encode(model, tokens=tokenizer(texts[i:i + batch_size]))
             for i in range(0, len(texts), batch_size)]
    return np.concatenate(parts, axis=0)


def model_logit_params(model) -> tuple[float, float | None]:
    """``(a, b)``: ``a = exp(model.logit_scale)`` and the SigLIP bias ``b`` (None when absent)."""
    import torch

    with torch.no_grad():
        scale = float(model.logit_scale.exp().float().reshape(-1)[0])
        bias = getattr(model, "logit_bias", None)
        bias = None if bias is None else float(bias.float().reshape(-1)[0])
    return scale, bias


# --------------------------------------------------------------------------------------------------
# Input listing
# --------------------------------------------------------------------------------------------------


def read_captions(path: Path, string_columns: Sequence[str]) -> pa.Table:
    """Read a captions file (CSV, TSV, JSONL or parquet, by suffix).

    Args:
        path: the file.
        string_columns: columns read as text whatever they look like (image paths, captions, uids).

    Raises:
        BadInput: missing or unreadable file, unsupported suffix, missing column.
    """
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    if not path.is_file():
        raise BadInput(f"Captions file {path} does not exist")
    kind = CAPTION_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise BadInput(f"Captions file {path}: unsupported format {path.suffix!r}; use one of "
                       f"{', '.join(sorted(CAPTION_SUFFIXES))}")
    try:
        if kind in ("csv", "tsv"):
            parse = (pa_csv.ParseOptions(delimiter="\t", quote_char=False) if kind == "tsv"
                     else pa_csv.ParseOptions())
            convert = pa_csv.ConvertOptions(column_types={c: pa.string() for c in string_columns},
                                            strings_can_be_null=False)
            table = pa_csv.read_csv(path, parse_options=parse, convert_options=convert)
        elif kind == "jsonl":
            table = pa_json.read_json(path)
        else:
            table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise BadInput(f"Cannot read captions file {path}: {exc}") from exc
    for col in string_columns:
        if col not in table.column_names:
            raise BadInput(f"Captions file {path} has no {col!r} column; columns: "
                           f"{', '.join(table.column_names)}")
        if table.schema.field(col).type != pa.string():
            try:
                idx = table.column_names.index(col)
                table = table.set_column(idx, col, table.column(col).cast(pa.string()))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise BadInput(f"Captions file {path}: column {col!r} cannot be read as text: "
                               f"{exc}") from exc
    return table


def list_tar_shards(path: Path) -> list[Path]:
    """The ``.tar`` shards at ``path`` (the file itself, or a directory's ``*.tar`` in natural order)."""
    if path.is_file():
        if path.suffix.lower() != ".tar":
            raise BadInput(f"{path} is not a .tar shard (compressed tars are not supported)")
        return [path]
    return sorted((p for p in path.glob("*.tar") if p.is_file()), key=lambda p: natural_key(p.name))


@dataclass
class _TarIndex:
    """Column-wise listing of every sample in a set of tar shards (one row per sample key)."""

    shards: list[str]
    shard: np.ndarray  # int32 shard index
    row: np.ndarray  # int64 sample number within its shard
    spans: dict[str, np.ndarray]  # "image" | "txt" | "json" -> (n, 2) int64 (offset, size), -1 absent
    keys: pa.Array  # sample key within the shard
    members: pa.Array  # image member name ("" when absent)


def index_tar_shards(shards: Sequence[Path], problems: list[tuple[str, str]] | None = None) -> _TarIndex:
    """Read the member headers of every shard and group members into samples by key.

    Args:
        shards: the .tar files.
        problems: when given, an unreadable or truncated shard does not stop the listing: its
            members read before the damage are kept (a cut-off member then fails to read and is
            skipped by name), and ``(shard, reason)`` is appended here.

    Raises:
        BadInput: a shard is unreadable and ``problems`` is None; the message names it.
    """
    shard_col, row_col, key_col, member_col = [], [], [], []
    spans: dict[str, list] = {"image": [], "txt": [], "json": []}
    for s, shard in enumerate(shards):
        groups: dict[str, dict[str, tuple[int, int, str]]] = {}
        try:
            with tarfile.open(shard, mode="r:") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    dirname, base = posixpath.split(member.name)
                    stem, dot, ext = base.partition(".")
                    if not dot or not stem:
                        continue  # no extension, or a hidden file such as ._foo (macOS)
                    key = posixpath.join(dirname, stem)
                    groups.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size,
                                                               member.name)
        except (tarfile.TarError, OSError, EOFError) as exc:
            if problems is None:
                raise BadInput(f"Cannot read tar shard {shard}: {exc}; pass skip_bad=True (--skip-bad) to "
                               "keep what can be read of it") from exc
            problems.append((str(shard), f"unreadable tar shard ({exc}); {len(groups)} samples before "
                                         "the damage kept"))
        for row, (key, members) in enumerate(groups.items()):
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            shard_col.append(s)
            row_col.append(row)
            key_col.append(key)
            member_col.append(image[2] if image else "")
            for kind, entry in (("image", image), ("txt", members.get("txt")),
                                ("json", members.get("json"))):
                spans[kind].append((entry[0], entry[1]) if entry else (-1, -1))
    return _TarIndex(
        shards=[str(p) for p in shards],
        shard=np.asarray(shard_col, dtype=np.int32),
        row=np.asarray(row_col, dtype=np.int64),
        spans={k: np.asarray(v, dtype=np.int64).reshape(-1, 2) for k, v in spans.items()},
        keys=pa.array(key_col, pa.string()),
        members=pa.array(member_col, pa.string()),
    )


# --------------------------------------------------------------------------------------------------
# Datasets (run in DataLoader workers: decode + preprocess; errors are returned, not raised)
# --------------------------------------------------------------------------------------------------


def _load_image(preprocess: Callable, data: bytes | str):
    """Decode, turn upright (EXIF orientation), bring to 8-bit RGB, preprocess."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        upright = ImageOps.exif_transpose(img)  # phone photos are stored sideways with a rotate tag
        return preprocess(_to_8bit(upright).convert("RGB"))


def _to_8bit(img):
    """A high-bit-depth grey image (16-bit, 32-bit int, float) scaled into 0..255.

    PIL's ``convert("RGB")`` clips such values at 255 (a 16-bit image becomes white) or to 0 (floats
    in 0..1 become black). 16-bit images are scaled by 1/257; 32-bit ints by the range their values
    suggest (0..255, 0..65535, else 0..max); floats in 0..1 by 255, other floats by their min-max.
    """
    from PIL import Image

    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img
    a = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        lo, hi = (0.0, 1.0) if a.size and a.min() >= 0 and a.max() <= 1 else (float(a.min()), float(a.max()))
    elif img.mode.startswith("I;16"):  # the type's own range: a dark 16-bit image stays dark
        lo, hi = 0.0, 65535.0
    else:  # "I": 32-bit ints, often 16-bit data; guess the range from the values
        top = float(a.max()) if a.size else 0.0
        lo, hi = 0.0, (255.0 if top <= 255 else 65535.0 if top <= 65535 else top)
    scaled = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


class _FolderDataset:
    """Map-style dataset over image files: item -> (index, pixels | None, error | None, None, None)."""

    def __init__(self, paths: pa.Array, errors: list[str | None], preprocess: Callable) -> None:
        self.paths = paths
        self.errors = errors
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if self.errors[i] is not None:
            return i, None, self.errors[i], None, None
        path = self.paths[i].as_py()
        try:
            return i, _load_image(self.preprocess, path), None, None, None
        except FileNotFoundError:
            return i, None, "file not found", None, None
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad image
            return i, None, f"cannot decode image: {type(exc).__name__}: {exc}", None, None


class _TarDataset:
    """Map-style dataset over tar samples: item -> (index, pixels | None, error | None, caption, json).

    Members are read with ``os.pread`` on per-process file descriptors (safe after fork); at most
    ``MAX_OPEN_SHARDS`` stay open per process (least recently used closed first), so any number of
    shards works under the usual limit of open files.
    """

    MAX_OPEN_SHARDS = 16

    def __init__(self, index: _TarIndex, preprocess: Callable) -> None:
        self.index = index
        self.preprocess = preprocess
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index.shard)

    def _read(self, shard: int, span: np.ndarray) -> bytes:
        if self._pid != os.getpid():
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            while len(self._fds) >= self.MAX_OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
            fd = self._fds[shard] = os.open(self.index.shards[shard], os.O_RDONLY)
        else:
            self._fds.move_to_end(shard)
        offset, size = int(span[0]), int(span[1])
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read ({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = OrderedDict()

    def __getitem__(self, i: int):
        ix = self.index
        shard = int(ix.shard[i])
        if ix.spans["txt"][i, 0] < 0:
            return i, None, "no .txt caption member", None, None
        if ix.spans["image"][i, 0] < 0:
            return i, None, f"no image member ({'/'.join(IMAGE_EXTENSIONS)})", None, None
        try:
            caption = self._read(shard, ix.spans["txt"][i]).decode("utf-8").strip()
            meta = (self._read(shard, ix.spans["json"][i]).decode("utf-8")
                    if ix.spans["json"][i, 0] >= 0 else None)
        except (OSError, UnicodeDecodeError) as exc:
            return i, None, f"cannot read caption/json: {exc}", None, None
        try:
            pixels = _load_image(self.preprocess, self._read(shard, ix.spans["image"][i]))
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad image
            return i, None, f"cannot decode image: {type(exc).__name__}: {exc}", caption, meta
        return i, pixels, None, caption, meta


def _collate(items: list) -> dict:
    import torch

    ok = [it[1] for it in items if it[1] is not None]
    return {
        "index": [it[0] for it in items],
        "pixels": torch.stack(ok) if ok else None,
        "error": [it[2] for it in items],
        "caption": [it[3] for it in items],
        "json": [it[4] for it in items],
    }


# --------------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------------


class _Run:
    """Rows waiting to become one Batch: consecutive rows of one origin."""

    def __init__(self) -> None:
        self.origin: str | None = None
        self.first_row = 0
        self.next_row = 0
        self.rows: list[int] = []  # global sample indices
        self.image: list[np.ndarray] = []
        self.text: list[np.ndarray] = []
        self.captions: list[str] = []
        self.uids: list[str] = []
        self.jsons: list[str | None] = []

    def __len__(self) -> int:
        return len(self.rows)

    def continues(self, origin: str, row: int) -> bool:
        return self.origin == origin and self.next_row == row

    def add(self, origin: str, row: int, index: int, image: np.ndarray, text: np.ndarray,
            caption: str | None = None, uid: str | None = None, meta_json: str | None = None) -> None:
        if not self.rows:
            self.origin, self.first_row = origin, row
        self.next_row = row + 1
        self.rows.append(index)
        self.image.append(image)
        self.text.append(text)
        self.captions.append(caption)
        self.uids.append(uid)
        self.jsons.append(meta_json)


class OpenClipSource:
    """Encode an image-caption pool with an open_clip model (raw embeddings, ``raw_known=True``).

    Either ``images`` is an image folder and ``captions`` a captions file (CSV, TSV, JSONL or
    parquet; TSV is read without quoting), or ``captions`` is None and ``images`` is a webdataset
    ``.tar`` shard or a directory of them.

    Metadata: with a captions file every column is kept (``caption_column`` becomes ``caption``);
    ``origin`` is the captions file and ``row_offset`` its data row. With tar shards the columns are
    ``uid``, ``caption``, ``key`` (sample key in the shard) and ``json`` (the sample's json member
    as text, only when some sample has one; query it with DuckDB's JSON functions); ``origin`` is
    the shard and ``row_offset`` the sample number within it.

    uids: ``uid_column`` (a captions column, or a field of the json member) when given, else the
    md5 of the image path as written in the captions file, or of ``f"{shard name}/{image member}"``
    (see ``indexer.reader.UidDeriver`` for images listed more than once).

    Unreadable samples (missing or undecodable image, missing caption member) raise ``BadInput``
    naming the file, unless ``skip_bad=True``: then they are skipped, logged, and listed in
    ``source.skipped`` as ``(path, reason)`` after (and during) ``batches()``. ``info.n`` is the
    number of LISTED samples, an upper bound of what ``batches()`` yields when samples are
    skipped: the builder must count the rows it receives and truncate its arrays to that count.
    Batches never span a skipped sample, so ``row_offset + i`` is always the origin row of row i.

    Args:
        images: image folder, ``.tar`` shard, or directory of ``.tar`` shards.
        captions: captions file for an image folder; None for tar shards.
        model: open_clip model name (see ``load_model``).
        pretrained: pretrained tag or local checkpoint path (see ``load_model``).
        image_column: captions column with the image path relative to ``images``.
        caption_column: captions column with the caption.
        uid_column: column (or json field) with 32-hex-digit uids; None derives them.
        batch_size: samples per forward pass.
        num_workers: DataLoader workers decoding images; None picks ``min(8, cpus - 1)`` (0 for
            a pool that fits in one batch).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...; autocast is used on CUDA only.
        skip_bad: skip unreadable samples instead of raising.
        progress: progress hook; advanced by every processed sample (encoded or skipped).
        bundle: an already loaded ``ModelBundle`` to use instead of loading ``model``/``pretrained``
            again (they are still recorded in ``info``).

    Raises:
        BadInput: missing inputs, unreadable captions file or shard, missing column, bad uid.
        InvalidParameter: inconsistent arguments (see also ``load_model``).
    """

    def __init__(self, images: Path | str, captions: Path | str | None, model: str,
                 pretrained: str | None, image_column: str = "image",
                 caption_column: str = "caption", uid_column: str | None = None,
                 batch_size: int = 256, num_workers: int | None = None, device: str = "auto",
                 skip_bad: bool = False, progress: Progress | None = None,
                 bundle: ModelBundle | None = None) -> None:
        self.images = Path(images)
        self.captions_path = Path(captions) if captions is not None else None
        self.image_column, self.caption_column, self.uid_column = image_column, caption_column, uid_column
        if int(batch_size) < 1:
            raise InvalidParameter(f"batch_size must be >= 1, got {batch_size!r}")
        if num_workers is not None and int(num_workers) < 0:
            raise InvalidParameter(f"num_workers must be >= 0, got {num_workers!r}")
        self.batch_size = int(batch_size)
        self.skip_bad = skip_bad
        self.progress = progress
        self.skipped: list[tuple[str, str]] = []
        self._shard_problems: list[tuple[str, str]] = []  # damaged .tar shards read in part (skip_bad)
        if not self.images.exists():
            raise BadInput(f"Image input {self.images} does not exist")

        if self.captions_path is not None:
            if not self.images.is_dir():
                raise InvalidParameter(f"A captions file goes with an image folder, but {self.images} "
                                       f"is not a directory (for .tar shards pass no captions file)")
            self._init_folder()
        else:
            shards = list_tar_shards(self.images)
            if not shards:
                raise BadInput(f"No captions file given and no .tar shards in {self.images}")
            if (image_column, caption_column) != ("image", "caption"):
                raise InvalidParameter("image_column / caption_column (--image-column / --caption-column) "
                                       "name columns of a captions file; .tar shards pair each image with "
                                       "its .txt member")
            self._init_tar(shards)

        self.device = device
        self.bundle = bundle if bundle is not None else load_model(model, pretrained, device)
        logit_scale, logit_bias = model_logit_params(self.bundle.model)
        dim = encode_texts(self.bundle, [""]).shape[1]
        n = self._n
        if num_workers is None:
            num_workers = 0 if n <= self.batch_size else min(8, max(1, (os.cpu_count() or 2) - 1))
        self.num_workers = int(num_workers)
        self.info = SourceInfo(
            source="open_clip", n=n, dim=dim, raw_known=True, logit_scale=logit_scale,
            logit_bias=logit_bias, model=model, pretrained=_pretrained_label(pretrained),
            extra={"input": str(self.images), "format": self.format,
                   "captions": str(self.captions_path) if self.captions_path else None,
                   "skip_bad": skip_bad, "n_is_upper_bound": skip_bad, **self._extra},
        )
        logger.info("open_clip source %s: %d samples (%s), model %s, dim %d, a=%.4g", self.images, n,
                    self.format, model, dim, logit_scale)

    # -- listing -------------------------------------------------------------------------------

    def _init_folder(self) -> None:
        path = self.captions_path
        cols = [self.image_column, self.caption_column] + ([self.uid_column] if self.uid_column else [])
        if self.uid_column is not None and self.uid_column == self.caption_column:
            raise InvalidParameter("uid_column and caption_column must differ")
        table = read_captions(path, list(dict.fromkeys(cols)))
        images = table.column(self.image_column).to_pylist()
        captions = table.column(self.caption_column)
        caption_null = captions.is_null().to_numpy(zero_copy_only=False)
        errors: list[str | None] = [None] * table.num_rows
        full: list[str] = []
        for row, rel in enumerate(images):
            if rel is None or rel == "":
                errors[row] = f"empty {self.image_column!r} value"
                full.append("")
            else:
                full.append(str(self.images / rel))
                if caption_null[row]:
                    errors[row] = f"empty {self.caption_column!r} value"
                elif not os.path.isfile(full[-1]):  # found now, not after encoding every row before it
                    errors[row] = "file not found"
        bad = [row for row, e in enumerate(errors) if e is not None]
        if bad and not self.skip_bad:
            row = bad[0]
            others = f"; {len(bad) - 1} more rows have problems" if len(bad) > 1 else ""
            raise BadInput(f"{full[row] or path} (row {row} of {path}): {errors[row]}{others}; pass "
                           "skip_bad=True (--skip-bad) to skip unreadable samples")
        if self.uid_column is not None:
            uid = normalize_uids(table.column(self.uid_column), str(path))
            drop = (self.uid_column,) if self.uid_column != self.image_column else ()
        else:
            derive = UidDeriver()
            uid = pa.array([derive(rel if rel else f"row:{row}") for row, rel in enumerate(images)],
                           pa.string())
            drop = ()
        self._origin = str(path)
        self._meta = arrange_meta(table, uid, self.caption_column, drop=drop)
        self._captions = self._meta.column("caption").combine_chunks()
        self._paths = pa.array(full, pa.string())
        self._errors = errors
        self._n = table.num_rows
        self.format = "folder"
        self._extra = {"image_column": self.image_column, "caption_column": self.caption_column,
                       "uid_column": self.uid_column}
        if self._n == 0:
            raise BadInput(f"Captions file {path} has no rows")

    def _init_tar(self, shards: list[Path]) -> None:
        problems: list[tuple[str, str]] | None = [] if self.skip_bad else None
        self._tar = index_tar_shards(shards, problems)
        self._shard_problems = problems or []  # reported again at the start of every batches()
        for shard, reason in self._shard_problems:
            logger.warning("Skipping the rest of %s: %s", shard, reason)
        self._n = len(self._tar.shard)
        if self._n == 0:
            raise BadInput(f"No samples in the .tar shards at {self.images}")
        self._has_json = bool((self._tar.spans["json"][:, 0] >= 0).any())
        if self.uid_column is not None and not self._has_json:
            raise BadInput(f"uid_column={self.uid_column!r} but the shards at {self.images} have no "
                           f".json members to read it from")
        names = [Path(s).name for s in self._tar.shards]
        derive = UidDeriver()
        members = self._tar.members.to_pylist()
        keys = self._tar.keys.to_pylist()
        self._tar_uids = [derive(f"{names[s]}/{m or k}")
                          for s, m, k in zip(self._tar.shard.tolist(), members, keys)]
        self.format = "webdataset"
        self._extra = {"shards": len(shards), "uid_column": self.uid_column}

    def _origin_row(self, index: int) -> tuple[str, int]:
        """(origin, row within origin) of a global sample index."""
        if self.format == "folder":
            return self._origin, index
        return self._tar.shards[int(self._tar.shard[index])], int(self._tar.row[index])

    def _describe(self, index: int) -> str:
        """The file to name in messages and in ``skipped``: image path or ``shard:member``."""
        if self.format == "folder":
            return self._paths[index].as_py() or self._origin
        shard = self._tar.shards[int(self._tar.shard[index])]
        return f"{shard}:{self._tar.members[index].as_py() or self._tar.keys[index].as_py()}"

    # -- streaming -------------------------------------------------------------------------------

    def _bad(self, index: int, reason: str) -> None:
        origin, row = self._origin_row(index)
        where = self._describe(index)
        if not self.skip_bad:
            raise BadInput(f"{where} (row {row} of {origin}): {reason}; pass skip_bad=True "
                           f"(--skip-bad) to skip unreadable samples")
        self.skipped.append((where, reason))
        level = logging.WARNING if len(self.skipped) <= _MAX_SKIP_WARNINGS else logging.DEBUG
        logger.log(level, "Skipping %s (row %d of %s): %s", where, row, origin, reason)
        if len(self.skipped) == _MAX_SKIP_WARNINGS:
            logger.warning("Further skipped samples are logged at DEBUG level")

    def _flush(self, run: _Run) -> Batch:
        rows = run.rows
        if self.format == "folder":
            meta = self._meta.slice(rows[0], len(rows))
        else:
            cols = {"uid": pa.array(run.uids, pa.string()),
                    "caption": pa.array(run.captions, pa.string()),
                    "key": self._tar.keys.take(pa.array(rows, pa.int64()))}
            if self._has_json:
                cols["json"] = pa.array(run.jsons, pa.string())
            meta = pa.table(cols)
        return Batch(meta=meta, image=np.stack(run.image).astype(np.float32, copy=False),
                     text=np.stack(run.text).astype(np.float32, copy=False), origin=run.origin,
                     row_offset=run.first_row)

    def _tar_uid(self, index: int, meta_json: str | None) -> str | None:
        """uid of a tar sample, or raises ValueError with the reason."""
        if self.uid_column is None:
            return self._tar_uids[index]
        try:
            value = json.loads(meta_json)[self.uid_column] if meta_json is not None else None
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"json member has no {self.uid_column!r} field ({exc})") from exc
        if value is None:
            raise ValueError(f"json member has no {self.uid_column!r} field")
        origin, row = self._origin_row(index)
        return normalize_uids(pa.array([str(value)]), f"{self._describe(index)} json", row)[0].as_py()

    #: a Ray build reads the parts on Ray Data actors that load the model once each (``indexer.parallel``),
    #: one GPU per actor when its cluster has GPUs
    encodes = True

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Encode the pool and yield batches of raw embeddings, ``batch_size`` rows at most.

        ``self.skipped`` is reset at the start (to the damaged shards read only in part, with
        ``skip_bad``) and lists the skipped samples as they occur.

        Raises:
            BadInput: an unreadable sample (naming the file) when ``skip_bad`` is False.
        """
        if int(batch_size) < 1:
            raise InvalidParameter(f"batch_size must be >= 1, got {batch_size!r}")
        self.skipped = list(self._shard_problems)
        yield from self._encoded(None, batch_size, self.progress or null_progress, self.num_workers)

    def parts(self) -> list[Part]:
        """The listing in parts of ``PART_SAMPLES`` samples (rounded up to whole batches of
        ``batch_size``), encoded on their own by a Ray build's actors (``indexer.parallel``);
        ``skipped`` is reset to the damaged shards read only in part. A part starts where a batch of
        ``batches()`` starts, so its samples are encoded in the same forward passes, and come out
        the same to the last bit on the same kind of device (a matrix product's rounding depends on
        how many rows it has)."""
        self.skipped = list(self._shard_problems)
        size = -(-PART_SAMPLES // self.batch_size) * self.batch_size
        return [Part(i, start, min(size, self._n - start)) for i, start in enumerate(range(0, self._n, size))]

    def read_part(self, part: Part, batch_size: int) -> Iterator[Batch]:
        """The batches of one part, encoded in this process on ``device`` (images decoded here, no
        DataLoader workers); ``skipped`` lists the part's skipped samples."""
        self.skipped = []
        model = self.bundle.model
        device = resolve_device(self.device)  # on a Ray actor: the GPU Ray gave it, if any
        if _model_device(model).type != device.type:
            self.bundle = self.bundle._replace(model=model.to(device))
        yield from self._encoded(range(part.start, part.start + part.rows), batch_size, null_progress, 0)

    def __getstate__(self) -> dict:
        """What a Ray build sends to its actors, each once: the model itself (so that they encode
        with the same weights, wherever the checkpoint is), on the CPU; no progress hook."""
        state = {**self.__dict__, "progress": None}
        model = self.bundle.model
        if _model_device(model).type != "cpu":
            state["bundle"] = self.bundle._replace(model=copy.deepcopy(model).cpu())
        return state

    def _encoded(self, indices: range | None, batch_size: int, progress: Progress,
                 num_workers: int) -> Iterator[Batch]:
        """Encode the samples ``indices`` (None: all) in order; batches of consecutive rows of one
        origin, ``batch_size`` at most."""
        dataset, loader = self._loader(indices, num_workers)
        run = _Run()
        n_done = 0
        try:
            with progress("Encoding images and captions", self.info.n if indices is None else len(indices)) \
                    as advance:
                for item in loader:
                    for index, image, text, caption, uid, meta_json in self._encode(item):
                        origin, row = self._origin_row(index)
                        if len(run) and (not run.continues(origin, row) or len(run) >= batch_size):
                            yield self._flush(run)
                            run = _Run()
                        run.add(origin, row, index, image, text, caption, uid, meta_json)
                    n_done += len(item["index"])
                    advance(len(item["index"]))
                if len(run):
                    yield self._flush(run)
        finally:
            if isinstance(dataset, _TarDataset):
                dataset.close()
        if self.skipped:
            logger.warning("Skipped %d of %d samples (unreadable); see source.skipped",
                           len(self.skipped), n_done)

    def _loader(self, indices: range | None, num_workers: int):
        """(dataset, DataLoader) decoding and preprocessing the images of ``indices`` (None: all),
        ``self.batch_size`` at a time."""
        from torch.utils.data import DataLoader, Subset

        preprocess = self.bundle.preprocess
        if self.format == "folder":
            dataset = _FolderDataset(self._paths, self._errors, preprocess)
        else:
            dataset = _TarDataset(self._tar, preprocess)
        loader = DataLoader(dataset if indices is None else Subset(dataset, indices), batch_size=self.batch_size,
                            shuffle=False, num_workers=num_workers, collate_fn=_collate,
                            pin_memory=_model_device(self.bundle.model).type == "cuda",
                            prefetch_factor=2 if num_workers > 0 else None)
        return dataset, loader

    def _encode(self, item: dict) -> list[tuple]:
        """``(index, image embedding, text embedding, caption, uid, json)`` of the readable samples
        of one loader batch, encoded; the others are skipped (``_bad``)."""
        import torch

        good, captions, jsons, uids = [], [], [], []
        for pos, index in enumerate(item["index"]):
            error = item["error"][pos]
            uid = None
            if error is None and self.format == "webdataset":
                try:
                    uid = self._tar_uid(index, item["json"][pos])
                except ValueError as exc:
                    error = str(exc)
            if error is not None:
                self._bad(index, error)
                continue
            good.append(pos)
            uids.append(uid)
            jsons.append(item["json"][pos])
            captions.append(item["caption"][pos] if self.format == "webdataset"
                            else self._captions[index].as_py())
        if not good:
            return []
        # item["pixels"] holds the images that decoded; keep those of the samples still good
        decoded = [p for p in range(len(item["index"])) if item["error"][p] is None]
        rank = {pos: k for k, pos in enumerate(decoded)}
        pixels = item["pixels"]
        keep = [rank[pos] for pos in good]
        if len(keep) != pixels.shape[0]:
            pixels = pixels[torch.as_tensor(keep)]
        model, _, tokenizer = self.bundle
        image_emb = _encode(model, pixels=pixels)
        text_emb = _encode(model, tokens=tokenizer(captions))
        return [(item["index"][pos], image_emb[k], text_emb[k], captions[k], uids[k], jsons[k])
                for k, pos in enumerate(good)]

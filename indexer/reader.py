"""Sources of precomputed embeddings: DataComp metadata shards and clip-retrieval output folders.

Both readers check everything they can from file headers when they are constructed (shards present
and paired, array keys, row counts, dimensions), so a bad input fails before a long build starts.
``batches()`` then streams one shard at a time: ``.npy`` files and uncompressed ``.npz`` members are
memory-mapped and converted to float32 one batch at a time; compressed ``.npz`` members are loaded
one array at a time. Only the metadata of the current shard is held in memory.

Both also read a URI (``s3://bucket/metadata``, ``memory://pool``; see ``indexer.fs``): headers are
read through fsspec, array rows are streamed one batch at a time with ranged reads (a compressed
``.npz`` member is read whole, as locally), parquet through a file object. A plain path or a
``file://`` URI keeps the local code path above.

Vectors are neither normalised nor validated here (see ``indexer.source``); uids are lowercased and
checked (32 hex digits) because the reader can name the file and row.

The helpers ``md5_uid``, ``UidDeriver``, ``normalize_uids`` and ``arrange_meta`` are shared with
``indexer.embed``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_density_index.indexer.errors import BadInput, InvalidParameter
from clip_density_index.indexer.fs import RemotePath, input_path
from clip_density_index.indexer.source import Batch, Part, SourceInfo
from clip_density_index.indexer.validate import UID_PATTERN

logger = logging.getLogger(__name__)

#: Column names of ``samples`` that the index sets itself; a source column of that name (any case,
#: as DuckDB's names are case-insensitive) is kept with the suffix ``_source``.
RESERVED_COLUMNS = ("uid", "caption", "vec_id")

#: DataComp ``arch`` -> (open_clip model name, open_clip pretrained tag) that produced the arrays.
DATACOMP_ARCHS: dict[str, tuple[str, str]] = {
    "b32": ("ViT-B-32", "openai"),
    "l14": ("ViT-L-14", "openai"),
}

_SHARD_RE = {
    "image": re.compile(r"^img_emb_(\d+)\.npy$"),
    "text": re.compile(r"^text_emb_(\d+)\.npy$"),
    "meta": re.compile(r"^metadata_(\d+)\.parquet$"),
}


# --------------------------------------------------------------------------------------------------
# Shared helpers (also used by indexer.embed)
# --------------------------------------------------------------------------------------------------


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers numerically (``shard_2`` before ``shard_10``).

    >>> sorted(["s10", "s2", "s1"], key=natural_key)
    ['s1', 's2', 's10']
    """
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text.lower())]


def md5_uid(key: str) -> str:
    """The uid derived from a stable key: the md5 hex digest (32 lowercase hex digits).

    >>> md5_uid("a.jpg")
    '394659692a460258b45a99f1424ea357'
    """
    return hashlib.md5(key.encode("utf-8")).hexdigest()


class UidDeriver:
    """Derives unique uids from stable keys, deterministically in the order keys are given.

    The first occurrence of a key gets ``md5(key)``; its k-th repeat (k >= 1) gets
    ``md5(f"{key}#{k}")``, so a pool listing the same image twice (e.g. several captions per
    image) still has unique uids. Create a new deriver for every pass over a source.
    """

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self._repeats: dict[str, int] = {}

    def __call__(self, key: str) -> str:
        digest = hashlib.md5(key.encode("utf-8")).digest()
        if digest not in self._seen:
            self._seen.add(digest)
            return digest.hex()
        k = self._repeats.get(key, 0) + 1
        self._repeats[key] = k
        return md5_uid(f"{key}#{k}")


def normalize_uids(values: pa.Array | pa.ChunkedArray, origin: str, row_offset: int = 0) -> pa.Array:
    """Cast uids to lowercase strings and check they are 32 hex digits.

    Args:
        values: the uid column.
        origin: the file the column came from (for the error message).
        row_offset: row of ``values[0]`` within ``origin``.

    Returns:
        A ``pa.string()`` array of lowercase uids.

    Raises:
        BadInput: a uid is null or not 32 hex digits; the message names the file, row and value.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], pa.string())
    try:
        uids = pc.utf8_lower(pc.utf8_trim_whitespace(values.cast(pa.string())))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise BadInput(f"{origin}: uid column of type {values.type} cannot be read as text: {exc}") from exc
    ok = pc.fill_null(pc.match_substring_regex(uids, UID_PATTERN), False).to_numpy(zero_copy_only=False)
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        value = values[bad].as_py()
        raise BadInput(
            f"{origin} row {row_offset + bad}: uid {value!r} is not 32 hex digits "
            f"({int((~ok).sum())} bad uid(s) in this file)"
        )
    return uids


def _first_invalid_utf8(values: pa.ChunkedArray | pa.Array) -> int | None:
    """Row of the first binary value that is not valid UTF-8, or None."""
    for row, value in enumerate(values.to_pylist()):
        if isinstance(value, bytes):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return row
    return None


def caption_text(values: pa.ChunkedArray | pa.Array, origin: str, column: str,
                 row_offset: int = 0) -> pa.ChunkedArray | pa.Array:
    """A caption column as ``pa.string()``.

    Raises:
        BadInput: a binary value is not valid UTF-8 (the message names the file, column and row),
            or the column's type cannot be read as text (a list, a struct, ...).
    """
    if values.type == pa.string():
        return values
    try:
        return values.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type) \
                or pa.types.is_fixed_size_binary(values.type):
            row = _first_invalid_utf8(values)
            where = f" row {row_offset + row}" if row is not None else ""
            raise BadInput(f"{origin}{where}: column {column!r} holds bytes that are not valid UTF-8 "
                           "text; captions must be UTF-8") from None
        raise BadInput(f"{origin}: column {column!r} of type {values.type} cannot be read as caption "
                       f"text ({str(exc).splitlines()[0]})") from None


def arrange_meta(table: pa.Table, uid: pa.Array, caption_column: str,
                 drop: Sequence[str] = (), origin: str = "the metadata") -> pa.Table:
    """Metadata table with ``uid`` and ``caption`` first, then every other source column.

    Args:
        table: the source metadata rows.
        uid: the uid of every row (32 lowercase hex digits).
        caption_column: the column of ``table`` holding the caption; it becomes ``caption``.
        drop: columns of ``table`` not to keep (e.g. the column that became ``uid``).
        origin: the file the rows come from (for messages).

    Returns:
        The arranged table. A remaining source column named ``uid``, ``caption`` or ``vec_id`` (a
        name the index uses itself) is kept as ``uid_source`` / ``caption_source`` / ``vec_id_source``.

    Raises:
        BadInput: the caption column is not text (``caption_text``).
    """
    caption = caption_text(table.column(caption_column), origin, caption_column)
    names, arrays = ["uid", "caption"], [uid, caption]
    for name in table.column_names:
        if name == caption_column or name in drop:
            continue
        names.append(f"{name}_source" if name.lower() in RESERVED_COLUMNS else name)
        arrays.append(table.column(name))
    return pa.table(arrays, names=names)


def _check_logit_scale(logit_scale: float) -> float:
    value = float(logit_scale)
    if not np.isfinite(value) or value <= 0:
        raise InvalidParameter(f"logit_scale must be a positive number (a = exp(logit_scale), about 100 "
                               f"for CLIP), got {logit_scale!r}")
    return value


def _check_batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise InvalidParameter(f"batch_size must be >= 1, got {batch_size!r}")
    return int(batch_size)


# --------------------------------------------------------------------------------------------------
# Array access: .npy files and .npz members, header-only until the data is needed
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ArrayRef:
    """One 2-D embedding array on disk: a ``.npy`` file or a member ``key`` of an ``.npz``."""

    path: Path | RemotePath
    key: str | None  # npz member name (without .npy); None for a plain .npy file
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    data_offset: int | None  # byte offset of the raw data in ``path`` when it can be memory-mapped

    @property
    def label(self) -> str:
        return f"{self.path}[{self.key}]" if self.key else str(self.path)

    def load(self) -> np.ndarray | _RemoteRows:
        """The array: memory-mapped where possible, else read (one npz member only). A remote
        array whose data can be addressed is a ``_RemoteRows`` that reads the rows sliced."""
        n = self.shape[0] if self.shape else 0
        try:
            if n == 0:
                return np.zeros(self.shape, dtype=self.dtype)
            if isinstance(self.path, RemotePath):
                return self._load_remote()
            if self.data_offset is not None:
                return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.data_offset,
                                 shape=self.shape, order="F" if self.fortran else "C")
            with np.load(self.path, allow_pickle=False) as npz:
                return npz[self.key]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
            raise BadInput(f"Cannot read {self.label}: {exc}") from exc

    def _load_remote(self) -> np.ndarray | _RemoteRows:
        if self.data_offset is not None and not self.fortran:
            return _RemoteRows(self)
        if self.data_offset is not None:  # column-major: no row is contiguous, read it whole
            size = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
            data = self.path.read_range(self.data_offset, self.data_offset + size)
            return np.ndarray(self.shape, dtype=self.dtype, buffer=data, order="F")
        with self.path.open("rb") as fp, np.load(fp, allow_pickle=False) as npz:
            return npz[self.key]


class _RemoteRows:
    """Rows of a remote C-order array, read on slicing (``rows[start:stop]``) with one ranged read:
    a remote shard is streamed batch by batch as a local one is through its memory map."""

    def __init__(self, ref: _ArrayRef) -> None:
        self.ref = ref
        self.shape, self.dtype = ref.shape, ref.dtype
        self.row_bytes = int(np.prod(ref.shape[1:], dtype=np.int64)) * ref.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice):
            raise TypeError("remote rows are read by slices")
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise TypeError("remote rows are read by contiguous slices")
        stop = max(start, stop)
        base = self.ref.data_offset
        data = self.ref.path.read_range(base + start * self.row_bytes, base + stop * self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape((stop - start, *self.shape[1:]))


def _read_npy_header(fp) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    return np.lib.format.read_array_header_2_0(fp)


def _npy_ref(path: Path | RemotePath) -> _ArrayRef:
    """Header of a ``.npy`` file (nothing else is read)."""
    try:
        with path.open("rb") as fp:
            shape, fortran, dtype = _read_npy_header(fp)
            offset = fp.tell()
        size = path.stat().st_size
    except (OSError, ValueError, EOFError) as exc:
        raise BadInput(f"Cannot read {path}: not a valid .npy file ({exc})") from exc
    expected = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if size < expected:
        raise BadInput(f"Cannot read {path}: file is truncated ({size} bytes, header says shape "
                       f"{tuple(shape)} {np.dtype(dtype)}: {expected} bytes)")
    return _ArrayRef(path, None, tuple(shape), np.dtype(dtype), bool(fortran), offset)


def _npz_refs(path: Path | RemotePath) -> dict[str, _ArrayRef]:
    """Headers of every array in an ``.npz`` file; stored (uncompressed) members are mappable."""
    refs: dict[str, _ArrayRef] = {}
    try:
        with path.open("rb") as raw, zipfile.ZipFile(path if isinstance(path, Path) else raw) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[: -len(".npy")]
                with zf.open(info) as member:
                    shape, fortran, dtype = _read_npy_header(member)
                    header_len = member.tell()
                offset = None
                if info.compress_type == zipfile.ZIP_STORED:
                    raw.seek(info.header_offset)
                    local = raw.read(30)
                    if local[:4] == b"PK\x03\x04":
                        name_len, extra_len = struct.unpack("<HH", local[26:30])
                        offset = info.header_offset + 30 + name_len + extra_len + header_len
                refs[key] = _ArrayRef(path, key, tuple(shape), np.dtype(dtype), bool(fortran), offset)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInput(f"Cannot read {path}: not a valid .npz file ({exc})") from exc
    return refs


def _check_embedding_ref(ref: _ArrayRef) -> None:
    if len(ref.shape) != 2:
        raise BadInput(f"{ref.label}: expected a 2-D (rows, dim) array, got shape {ref.shape}")
    if ref.dtype.kind != "f":
        raise BadInput(f"{ref.label}: expected floating-point embeddings, got dtype {ref.dtype}")


def _parquet_footer(path: Path | RemotePath) -> tuple[int, pa.Schema]:
    """Row count and Arrow schema from a parquet footer.

    Raises:
        BadInput: not a parquet file, or two columns whose names differ only in case (``uid`` and
            ``UID``): the catalog's column names ignore case, so one would hide the other.
    """
    try:
        if isinstance(path, RemotePath):
            with path.open("rb") as fp:
                pf = pq.ParquetFile(fp)
                num_rows, schema = pf.metadata.num_rows, pf.schema_arrow
        else:
            pf = pq.ParquetFile(path)
            num_rows, schema = pf.metadata.num_rows, pf.schema_arrow
    except (OSError, pa.ArrowException) as exc:
        raise BadInput(f"Cannot read {path}: not a valid parquet file ({exc})") from exc
    seen: dict[str, int] = {}
    for i, name in enumerate(schema.names):
        j = seen.setdefault(name.lower(), i)
        if j != i:
            first = schema.names[j]
            same = "the same name" if first == name else "names that differ only in case"
            raise BadInput(f"{path} has two columns {first!r} and {name!r} ({same}); column names "
                           "are case-insensitive in the catalog: rename or drop one")
    return num_rows, schema


def unify_metadata_schemas(schemas: Sequence[tuple[Path, pa.Schema]]) -> pa.Schema:
    """One schema for the metadata of every shard: the union of their columns, in first-seen order.

    Shards written at different times often differ a little: a column only some shards have (it is
    NULL in the others), an all-NULL column in one shard, int64 in one shard and float64 in another
    (widened to float64). Types that cannot be reconciled (a number in one shard, a string in
    another) are an error naming both files. Columns that are NULL in every shard become strings.

    Raises:
        BadInput: two shards give a column incompatible types.
    """
    canonical: dict[str, str] = {}  # lower-cased name -> first spelling (DuckDB ignores case)
    schemas = [(path, _plain_schema(schema, canonical)) for path, schema in schemas]
    unified = schemas[0][1]
    for path, schema in schemas[1:]:
        try:
            unified = pa.unify_schemas([unified, schema], promote_options="permissive")
        except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
            for field in schema:
                if field.name not in unified.names:
                    continue
                other = unified.field(field.name).type
                try:
                    pa.unify_schemas([pa.schema([(field.name, other)]), pa.schema([field])],
                                     promote_options="permissive")
                except (pa.ArrowTypeError, pa.ArrowInvalid):
                    first = next(p for p, sc in schemas if field.name in sc.names)
                    raise BadInput(
                        f"Metadata column {field.name!r} is {field.type} in {path} but {other} in "
                        f"{first}; the shards' columns must have "
                        "compatible types"
                    ) from None
            raise BadInput(f"Cannot combine the metadata columns of {path} with the earlier shards: "
                           f"{exc}") from exc
    for i, field in enumerate(unified):
        if pa.types.is_null(field.type):
            unified = unified.set(i, field.with_type(pa.string()))
    for path, schema in schemas:
        missing = [name for name in unified.names if name not in schema.names]
        if missing:
            logger.warning("%s has no column %s; its rows get NULL there", path,
                           ", ".join(repr(m) for m in missing))
    return unified


def _plain_schema(schema: pa.Schema, canonical: dict[str, str]) -> pa.Schema:
    """``schema`` with dictionary-encoded fields as their value type (pandas categoricals unify
    with plain strings that way) and names spelled as first seen, case-insensitively."""
    fields = []
    for f in schema:
        name = canonical.setdefault(f.name.lower(), f.name)
        typ = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
        fields.append(pa.field(name, typ, f.nullable))
    return pa.schema(fields)


def conform_to_schema(table: pa.Table, schema: pa.Schema, origin: str) -> pa.Table:
    """``table`` with ``schema``'s columns, in its order: missing ones NULL, the others cast.
    Column names match case-insensitively (``unify_metadata_schemas`` keeps the first spelling)."""
    by_lower = {name.lower(): name for name in table.column_names}
    arrays = []
    for field in schema:
        name = by_lower.get(field.name.lower())
        if name is None:
            arrays.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(name)
        if column.type != field.type:
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise BadInput(f"{origin}: column {field.name!r} cannot be read as {field.type} "
                               f"like the other shards: {exc}") from exc
        arrays.append(column)
    return pa.table(arrays, schema=schema)


def _read_parquet(path: Path | RemotePath) -> pa.Table:
    try:
        if isinstance(path, RemotePath):
            with path.open("rb") as fp:
                return pq.read_table(fp)
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise BadInput(f"Cannot read {path}: {exc}") from exc


@dataclass(frozen=True)
class _Shard:
    """One metadata file and its row-aligned image and text arrays."""

    meta_path: Path | RemotePath
    image: _ArrayRef
    text: _ArrayRef
    n: int
    index: int  # position (DataComp) or shard number (clip-retrieval)


def _check_shard(meta_path: Path, n_meta: int, image: _ArrayRef, text: _ArrayRef) -> int:
    """Check one shard's arrays against each other and the metadata; return the dimension."""
    for ref in (image, text):
        _check_embedding_ref(ref)
        if ref.shape[0] != n_meta:
            raise BadInput(f"Row counts disagree: {meta_path} has {n_meta} rows but {ref.label} has "
                           f"{ref.shape[0]}")
    if image.shape[1] != text.shape[1]:
        raise BadInput(f"Dimension mismatch between image and text embeddings: {image.label} has dim "
                       f"{image.shape[1]}, {text.label} has dim {text.shape[1]}")
    return image.shape[1]


def _check_dims(shards: Sequence[_Shard]) -> int:
    first = shards[0]
    dim = first.image.shape[1]
    for shard in shards[1:]:
        if shard.image.shape[1] != dim:
            raise BadInput(f"Dimension mismatch between shards: {shard.image.label} has dim "
                           f"{shard.image.shape[1]}, {first.image.label} has dim {dim}")
    return dim


def _stream(shards: Sequence[_Shard], batch_size: int, schema: pa.Schema,
            meta_of: Callable[[_Shard, pa.Table], pa.Table]) -> Iterator[Batch]:
    """Yield the shards' rows in order, ``batch_size`` rows at most, one shard in memory at a time.

    Each shard's metadata is first conformed to ``schema`` (``unify_metadata_schemas``)."""
    batch_size = _check_batch_size(batch_size)
    for shard in shards:
        if shard.n == 0:
            continue
        table = _read_parquet(shard.meta_path)
        if table.num_rows != shard.n:
            raise BadInput(f"Row counts disagree: {shard.meta_path} now has {table.num_rows} rows, "
                           f"{shard.n} when the source was opened")
        meta = meta_of(shard, conform_to_schema(table, schema, str(shard.meta_path)))
        image, text = shard.image.load(), shard.text.load()
        logger.debug("Reading %s (%d rows)", shard.meta_path, shard.n)
        for start in range(0, shard.n, batch_size):
            stop = min(start + batch_size, shard.n)
            try:  # views of the memory maps, in the files' own type: the builder converts them
                img, txt = image[start:stop], text[start:stop]
            except (OSError, ValueError) as exc:
                raise BadInput(f"Cannot read rows {start}..{stop - 1} of {shard.image.label} / "
                               f"{shard.text.label}: {exc}") from exc
            yield Batch(meta=meta.slice(start, stop - start), image=img, text=txt,
                        origin=str(shard.meta_path), row_offset=start)
        del image, text


def _shard_parts(shards: Sequence[_Shard]) -> list[Part]:
    starts = np.cumsum([0] + [s.n for s in shards]).tolist()
    return [Part(i, starts[i], s.n, key=i) for i, s in enumerate(shards)]


def _storage_dtype(shards: Sequence[_Shard]) -> str:
    """"float16" when every shard stores both modalities in half precision, else "float32"."""
    half = all(a.dtype == np.float16 for sh in shards for a in (sh.image, sh.text))
    return "float16" if shards and half else "float32"


def _require_dir(path: Path | RemotePath, what: str) -> Path | RemotePath:
    if not path.exists():
        raise BadInput(f"{what} directory {path} does not exist")
    if not path.is_dir():
        raise BadInput(f"{what} path {path} is not a directory")
    return path


# --------------------------------------------------------------------------------------------------
# DataComp
# --------------------------------------------------------------------------------------------------


class DataCompSource:
    """A DataComp metadata directory: ``*.parquet`` files, each with an ``.npz`` of the same stem.

    Each parquet has ``uid`` (32 hex digits), ``text`` (the caption), ``url``, ``original_width``,
    ``original_height``, ``clip_b32_similarity_score``, ``clip_l14_similarity_score`` and maybe more
    columns; its npz holds ``b32_img``, ``b32_txt``, ``l14_img``, ``l14_txt`` (usually float16,
    L2-normalised, computed with OpenAI CLIP ViT-B/32 and ViT-L/14), row-aligned with the parquet.

    Batches carry every parquet column, with ``text`` renamed ``caption`` and ``uid`` lowercased;
    ``origin`` is the parquet path (its npz has the same stem and the same row order).

    Args:
        path: the metadata directory: a path, or a URI (``s3://bucket/metadata``; see ``indexer.fs``).
        arch: ``"b32"`` or ``"l14"``: which pair of arrays to read.
        logit_scale: ``a`` of the model that produced the arrays (100 for OpenAI CLIP).

    Raises:
        BadInput: the directory is missing or holds no parquet files; a parquet has no npz (or an
            npz no parquet); an array key is missing; row counts or dimensions disagree; a file is
            unreadable; the ``uid`` or ``text`` column is missing.
        InvalidParameter: unknown ``arch`` or a non-positive ``logit_scale``; a URI whose filesystem
            is not installed.
    """

    def __init__(self, path: Path | str | RemotePath, arch: str = "b32", logit_scale: float = 100.0) -> None:
        if arch not in DATACOMP_ARCHS:
            raise InvalidParameter(f"arch must be one of {sorted(DATACOMP_ARCHS)}, got {arch!r}")
        self.path = _require_dir(input_path(path), "DataComp metadata")
        self.arch = arch
        logit_scale = _check_logit_scale(logit_scale)
        parquets = sorted(self.path.glob("*.parquet"), key=lambda p: natural_key(p.name))
        npzs = sorted(self.path.glob("*.npz"), key=lambda p: natural_key(p.name))
        if not parquets:
            raise BadInput(f"No DataComp shards (*.parquet with matching *.npz) found in {self.path}")
        parquet_stems = {p.stem for p in parquets}
        for npz in npzs:
            if npz.stem not in parquet_stems:
                raise BadInput(f"{npz} has no matching metadata file {npz.with_suffix('.parquet')}")
        shards, schemas = [], []
        for i, parquet in enumerate(parquets):
            npz = parquet.with_suffix(".npz")
            if not npz.is_file():
                raise BadInput(f"{parquet} has no matching embeddings file {npz}")
            n, schema = _parquet_footer(parquet)
            schemas.append((parquet, schema))
            columns = schema.names
            for required in ("uid", "text"):
                if required not in columns:
                    raise BadInput(f"{parquet} has no {required!r} column; columns: {', '.join(columns)}")
            refs = _npz_refs(npz)
            keys = (f"{arch}_img", f"{arch}_txt")
            for key in keys:
                if key not in refs:
                    raise BadInput(f"{npz} has no array {key!r}; arrays present: "
                                   f"{', '.join(sorted(refs)) or 'none'}")
            image, text = refs[keys[0]], refs[keys[1]]
            _check_shard(parquet, n, image, text)
            shards.append(_Shard(parquet, image, text, n, i))
        self._shards = shards
        self._schema = unify_metadata_schemas(schemas)
        dim = _check_dims(shards)
        model_name, pretrained = DATACOMP_ARCHS[arch]
        self.info = SourceInfo(
            source="datacomp", n=sum(s.n for s in shards), dim=dim, raw_known=False,
            dtype=_storage_dtype(shards), uids_checked=True,
            logit_scale=logit_scale, model=f"datacomp-{arch}", pretrained=pretrained,
            extra={"path": str(self.path), "arch": arch, "files": len(shards),
                   "open_clip_model": model_name, "open_clip_pretrained": pretrained,
                   "dtype": str(shards[0].image.dtype)},
        )
        logger.info("DataComp source %s: %d rows in %d files, arch %s, dim %d", self.path,
                    self.info.n, len(shards), arch, dim)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Stream the pool file by file, ``batch_size`` rows at most per batch.

        Raises:
            BadInput: a uid that is not 32 hex digits (naming file and row), or an unreadable file.
        """

        yield from _stream(self._shards, batch_size, self._schema, self._meta_of)

    def parts(self) -> list[Part]:
        """One part per shard (a Ray build reads them in parallel, ``indexer.parallel``)."""
        return _shard_parts(self._shards)

    def read_part(self, part: Part, batch_size: int) -> Iterator[Batch]:
        yield from _stream([self._shards[part.key]], batch_size, self._schema, self._meta_of)

    @staticmethod
    def _meta_of(shard: _Shard, table: pa.Table) -> pa.Table:
        uid = normalize_uids(table.column("uid"), str(shard.meta_path))
        return arrange_meta(table, uid, "text", drop=("uid",), origin=str(shard.meta_path))


# --------------------------------------------------------------------------------------------------
# clip-retrieval
# --------------------------------------------------------------------------------------------------


def _indexed_files(folder: Path | RemotePath, pattern: re.Pattern) -> dict[int, Path | RemotePath]:
    found: dict[int, Path | RemotePath] = {}
    if not folder.is_dir():
        return found
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m:
            i = int(m.group(1))
            if i in found:
                raise BadInput(f"Two shards with index {i}: {found[i]} and {p}")
            found[i] = p
    return found


class ClipRetrievalSource:
    """A folder written by clip-retrieval's ``clip inference`` (numpy output format)::

        PATH/img_emb/img_emb_{i}.npy       (n_i, dim) image embeddings, L2-normalised
        PATH/text_emb/text_emb_{i}.npy     (n_i, dim) text embeddings
        PATH/metadata/metadata_{i}.parquet image_path, caption, url, ... (row-aligned)

    Shards are matched by the number ``i`` (zero-padding is ignored) and read in numeric order.
    Batches carry every metadata column with ``uid`` and ``caption`` first; ``origin`` is the
    metadata parquet path.

    uids: the ``uid_column`` values when given (must be 32 hex digits), else derived: md5 of
    ``image_path``, else of ``url``, else of ``f"{i}:{row}"`` (see ``UidDeriver`` for repeats).

    Args:
        path: the clip-retrieval output folder: a path, or a URI (see ``indexer.fs``).
        logit_scale: ``a`` of the model that produced the embeddings (100 for OpenAI CLIP).
        caption_column: metadata column holding the caption.
        uid_column: metadata column holding 32-hex-digit uids, or None to derive them.
        model: optional name of the model that produced the embeddings (recorded in SourceInfo).
        pretrained: optional pretrained tag of that model (recorded in SourceInfo).

    Raises:
        BadInput: the folder is missing or holds no shards; a shard lacks one of its three files;
            row counts or dimensions disagree; a file is unreadable; a column is missing.
        InvalidParameter: a non-positive ``logit_scale``; a URI whose filesystem is not installed.
    """

    def __init__(self, path: Path | str | RemotePath, logit_scale: float = 100.0, caption_column: str = "caption",
                 uid_column: str | None = None, model: str | None = None,
                 pretrained: str | None = None) -> None:
        self.path = _require_dir(input_path(path), "clip-retrieval output")
        self.caption_column = caption_column
        self.uid_column = uid_column
        logit_scale = _check_logit_scale(logit_scale)
        files = {kind: _indexed_files(self.path / folder, _SHARD_RE[kind])
                 for kind, folder in (("image", "img_emb"), ("text", "text_emb"), ("meta", "metadata"))}
        indices = sorted(set().union(*files.values()))
        if not indices:
            raise BadInput(f"No clip-retrieval shards found in {self.path} (expected "
                           f"img_emb/img_emb_{{i}}.npy, text_emb/text_emb_{{i}}.npy, "
                           f"metadata/metadata_{{i}}.parquet)")
        expected = {"image": "img_emb/img_emb_{i}.npy", "text": "text_emb/text_emb_{i}.npy",
                    "meta": "metadata/metadata_{i}.parquet"}
        shards, schemas = [], []
        warned_uid = False
        for i in indices:
            for kind in ("meta", "image", "text"):
                if i not in files[kind]:
                    present = next(files[k][i] for k in files if i in files[k])
                    raise BadInput(f"Shard {i} is incomplete: {present} exists but "
                                   f"{self.path / expected[kind].format(i=i)} is missing")
            meta_path = files["meta"][i]
            n, schema = _parquet_footer(meta_path)
            schemas.append((meta_path, schema))
            columns = schema.names
            for col in (caption_column, uid_column):
                if col is not None and col not in columns:
                    raise BadInput(f"{meta_path} has no {col!r} column; columns: {', '.join(columns)}")
            if uid_column is None and "uid" in columns and not warned_uid:
                logger.warning("%s has a 'uid' column; pass uid_column='uid' to use it (deriving uids "
                               "from image_path/url instead, the column is kept as uid_source)",
                               meta_path)
                warned_uid = True
            image, text = _npy_ref(files["image"][i]), _npy_ref(files["text"][i])
            _check_shard(meta_path, n, image, text)
            shards.append(_Shard(meta_path, image, text, n, i))
        self._shards = shards
        self._schema = unify_metadata_schemas(schemas)
        dim = _check_dims(shards)
        self.info = SourceInfo(
            source="clip-retrieval", n=sum(s.n for s in shards), dim=dim, raw_known=False,
            dtype=_storage_dtype(shards), uids_checked=True,
            logit_scale=logit_scale, model=model, pretrained=pretrained,
            extra={"path": str(self.path), "shards": len(shards), "uid_column": uid_column,
                   "caption_column": caption_column, "dtype": str(shards[0].image.dtype)},
        )
        logger.info("clip-retrieval source %s: %d rows in %d shards, dim %d", self.path, self.info.n,
                    len(shards), dim)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Stream the pool shard by shard in numeric order, ``batch_size`` rows at most per batch.

        Raises:
            BadInput: a bad ``uid_column`` value (naming file and row), or an unreadable file.
        """
        derive = UidDeriver()

        def meta_of(shard: _Shard, table: pa.Table) -> pa.Table:
            return self._meta_of(shard, table, lambda keys: pa.array([derive(k) for k in keys], pa.string()))

        yield from _stream(self._shards, batch_size, self._schema, meta_of)

    def parts(self) -> list[Part]:
        """One part per shard (a Ray build reads them in parallel, ``indexer.parallel``). Derived
        uids depend on the keys of every shard before (``UidDeriver``): a part's ``uid`` column
        holds the keys, which ``finish_part`` turns into uids in pool order."""
        self._derive = UidDeriver()
        return _shard_parts(self._shards)

    def read_part(self, part: Part, batch_size: int) -> Iterator[Batch]:
        def meta_of(shard: _Shard, table: pa.Table) -> pa.Table:
            return self._meta_of(shard, table, lambda keys: pa.array(keys, pa.string()))

        yield from _stream([self._shards[part.key]], batch_size, self._schema, meta_of)

    def finish_part(self, meta: pa.Table) -> pa.Table:
        """A part's rows with their uids, derived from the keys ``read_part`` left in ``uid``."""
        if self.uid_column is not None:
            return meta
        keys = meta.column("uid").to_pylist()
        return meta.set_column(0, "uid", pa.array([self._derive(k) for k in keys], pa.string()))

    def _meta_of(self, shard: _Shard, table: pa.Table, derived: Callable[[list[str]], pa.Array]) -> pa.Table:
        """A shard's metadata with uid and caption first; uids from ``uid_column``, or
        ``derived(keys)`` of each row's key (its image_path, else url, else shard:row)."""
        origin = str(shard.meta_path)
        if self.uid_column is not None:
            uid = normalize_uids(table.column(self.uid_column), origin)
            return arrange_meta(table, uid, self.caption_column, drop=(self.uid_column,), origin=origin)
        keys: list = [None] * table.num_rows
        for col in ("url", "image_path"):  # later columns take precedence
            if col in table.column_names:
                for row, value in enumerate(table.column(col).to_pylist()):
                    if value is not None and value != "":
                        keys[row] = str(value)
        keys = [key if key is not None else f"{shard.index}:{row}" for row, key in enumerate(keys)]
        return arrange_meta(table, derived(keys), self.caption_column, origin=origin)

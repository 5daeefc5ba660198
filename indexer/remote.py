"""An index's copy at a URI (``s3://bucket/idx``, ``gs://...``, any protocol fsspec knows) and its
local mirror.

FAISS and DuckDB read local files, so an index at a URI is used through a mirror: a copy in a
local cache folder. The URI holds the index's files side by side and a small marker, ``index.json``
(format version, the build's ``created_at``, each file's size and CRC-32), which ``publish`` writes
last: a prefix without a marker is no index (or a half-uploaded one), never taken for one.

- ``publish(local_root, uri)`` uploads a built index: data files, then the catalog, then the
  marker. Files the URI's marker already lists with the same size and checksum are not sent again,
  so publishing the same build after ``score`` uploads the catalog and the marker only. Publishing
  another build to a URI first removes the marker there.
- ``mirror(uri)`` returns the local copy, ``cache_root()/<name>-<hash>/``: reused while its copy of
  the marker equals the URI's, else the files whose size or checksum changed are downloaded (to
  temporary names, checked against the marker, then renamed into place), under a lock so that the
  processes of one node download once.

The checksums are the ones the build records (``indexer.integrity``); the catalog's is computed at
each publish. Object stores have no locks: one writer at a time per URI is the user's
responsibility; a writer checks before it publishes that the URI still holds the build it opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from clip_density_index.indexer import lock
from clip_density_index.indexer.diskspace import disk_full, is_disk_full
from clip_density_index.indexer.errors import (BrokenIndex, FormatVersionMismatch, IndexNotFound, IndexReplaced,
                                               InvalidParameter, RemoteError)
from clip_density_index.indexer.fs import RemotePath, input_path, is_uri
from clip_density_index.indexer.integrity import crc32_file
from clip_density_index.indexer.layout import CATALOG, DATA_FILES, FORMAT_VERSION
from clip_density_index.indexer.progress import Progress, null_progress
from clip_density_index.indexer.store import first_line

log = logging.getLogger(__name__)

#: The marker at the URI (and its copy in a mirror), written last by ``publish``.
MARKER = "index.json"
#: The lock file in a mirror that its downloads and publishes hold (``indexer.lock.waiting``).
MIRROR_LOCK = ".lock-mirror"
#: A file being downloaded into a mirror: ``.NAME.part``, renamed to NAME once checked.
PART_SUFFIX = ".part"
#: The environment variable naming the folder of the mirrors (default ``default_cache()``).
CACHE_ENV = "CLIP_DENSITY_INDEX_CACHE"
#: The files of an index that a URI holds (``indexer.layout``); nothing else is uploaded, and a
#: marker naming another file is refused.
DATA_FILE = re.compile(rf"^({DATA_FILES})$")
_CHUNK = 16 << 20


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/clip-density-index/indexes`` (``~/.cache/...`` without XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clip-density-index" / "indexes"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The folder of the mirrors: ``cache_dir``, else ``$CLIP_DENSITY_INDEX_CACHE``, else ``default_cache()``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV) or default_cache())


def index_uri(value: str | Path) -> str | None:
    """The URI of an index at ``value`` without trailing slashes, or None for a local directory (a
    plain path or a ``file://`` URI).

    Raises:
        InvalidParameter: the URI's protocol is unknown or its fsspec package is missing (one line
            naming the package, ``indexer.fs``).
    """
    if not is_uri(value) or isinstance(input_path(value), Path):
        return None
    stripped = str(value).rstrip("/")
    return stripped if not stripped.endswith(":") else str(value)


def local_dir(uri: str, cache_dir: str | Path | None = None) -> Path:
    """The mirror folder of ``uri``: a readable name and a hash of the URI, under ``cache_root``.

    >>> local_dir("s3://bucket/pools/dc", "/c").as_posix()
    '/c/s3_bucket_pools_dc-603c3399b188'
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", uri)[-60:].strip("._") or "index"
    return cache_root(cache_dir) / f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def build_dir(uri: str, cache_dir: str | Path | None = None) -> Path:
    """Where a build for ``uri`` is written before it is published: the URI's mirror folder (the
    build replaces the mirror there as it would any index directory). A mirror whose first
    download did not finish (no catalog) is removed first: it is the cache's, not an index."""
    local = local_dir(uri, cache_dir)
    if local.is_dir() and not (local / CATALOG).is_file():
        shutil.rmtree(local)
    return local


# -- the marker ----------------------------------------------------------------------------------

def read_marker(uri: str) -> dict:
    """The marker of the index at ``uri``, checked.

    Raises:
        IndexNotFound: no marker there: no index, or one whose publish has not finished.
        FormatVersionMismatch: an index of another format version.
        BrokenIndex: the marker is not one.
        RemoteError: it cannot be read (network, permissions).
    """
    data = _fetch_marker(RemotePath.from_uri(uri), uri)
    if data is None:
        raise _missing(uri)
    return _checked(data, f"{uri}/{MARKER}", uri)


def _fetch_marker(remote: RemotePath, uri: str) -> bytes | None:
    path = (remote / MARKER).path
    try:
        return remote.fs.cat_file(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RemoteError(f"{uri}: cannot read {MARKER} ({first_line(e)})") from None


def _missing(uri: str) -> IndexNotFound:
    try:
        partial = any(DATA_FILE.match(p.name) for p in RemotePath.from_uri(uri).iterdir())
    except OSError:
        partial = False
    if partial:
        return IndexNotFound(f"{uri} holds no complete index: it has no {MARKER}, which publishing writes last "
                             "(a publish that was interrupted or is still running); publish it again "
                             f"(`cli.py build-index --out {uri}`)")
    return IndexNotFound(f"No index at {uri}: it has no {MARKER} (build one there with "
                         f"`cli.py build-index --out {uri}`)")


def _checked(data: bytes, where: str, uri: str) -> dict:
    """The parsed marker; ``FormatVersionMismatch`` or ``BrokenIndex`` naming ``where``."""
    try:
        m = json.loads(data)
    except ValueError as e:
        raise BrokenIndex(f"{where} is not JSON ({e}); publish the index again") from None
    if not isinstance(m, dict):
        raise BrokenIndex(f"{where} is not an index marker (no JSON object); publish the index again")
    if m.get("format_version") != FORMAT_VERSION:
        raise FormatVersionMismatch(f"Index at {uri} has format version {m.get('format_version')}; this tool reads "
                                    f"version {FORMAT_VERSION}. Rebuild it with `cli.py build-index --out {uri}`.")
    files = m.get("files")
    bad = ("it lists no files" if not isinstance(files, dict) or CATALOG not in files
           else "it has no created_at" if not isinstance(m.get("created_at"), str) else None)
    for name, rec in (files.items() if bad is None else ()):
        if not DATA_FILE.match(name):
            bad = f"it lists {name!r}, not a file of an index"
        elif not (isinstance(rec, dict) and all(isinstance(rec.get(k), int) and rec[k] >= 0
                                                for k in ("bytes", "crc32"))):
            bad = f"its record of {name} is not a size and a checksum"
    if bad:
        raise BrokenIndex(f"{where} is not an index marker ({bad}); publish the index again")
    return m


def _marker_bytes(marker: dict) -> bytes:
    return json.dumps(marker, indent=1, sort_keys=True).encode() + b"\n"


def _write_marker(root: Path, marker: dict) -> None:
    """The mirror's copy of the marker, replaced whole."""
    tmp = root / f".{MARKER}{PART_SUFFIX}"
    tmp.write_bytes(_marker_bytes(marker))
    os.replace(tmp, root / MARKER)


def _local_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _ordered(names) -> list[str]:
    """Data files first, then the catalog (and its write-ahead log): a reader that sees the new
    catalog sees the data files it describes."""
    return sorted(names, key=lambda name: (name.startswith(CATALOG), name))


# -- publish -------------------------------------------------------------------------------------

def publish(local_root: str | Path, uri: str, *, expected_created_at: str | None = None,
            progress: Progress | None = None) -> dict:
    """Upload the index at ``local_root`` to ``uri``; ``local_root`` is then its mirror.

    Files of this build that the URI's marker lists with the same size and checksum are kept;
    the others are uploaded, data files first, the catalog last, then the marker. Another build
    at ``uri`` has its marker removed first, so no reader mixes the two.

    Args:
        local_root: a built index directory (opened and checked first).
        uri: where to publish it (``s3://bucket/idx``; a URI fsspec can write).
        expected_created_at: the build the caller opened: ``uri`` must still hold it (a command
            that wrote the catalog of a mirror); None to publish whatever ``uri`` holds (a new build).
        progress: progress hook over the bytes uploaded.

    Returns:
        The marker written (or the one already there when nothing changed).

    Raises:
        IndexReplaced: ``expected_created_at`` is given and ``uri`` holds another build, or none.
        RemoteError: an upload failed (what was uploaded is not yet the index: the marker is written last).
    """
    from clip_density_index.indexer.pool import PoolIndex

    local_root, uri = Path(local_root), index_uri(uri) or uri
    pool = PoolIndex(local_root)  # a damaged or missing index is refused here, not uploaded
    remote = RemotePath.from_uri(uri)
    with lock.waiting(local_root, MIRROR_LOCK):
        files = _local_files(pool)
        raw = _fetch_marker(remote, uri)
        try:
            old = _checked(raw, f"{uri}/{MARKER}", uri) if raw is not None else None
        except (BrokenIndex, FormatVersionMismatch):
            old = None if expected_created_at is None else {}
        if expected_created_at is not None and (old or {}).get("created_at") != expected_created_at:
            raise IndexReplaced(f"Index at {uri} was rebuilt or removed after this command opened it: what it "
                                f"wrote is in the local mirror {str(local_root)!r} only; open {uri} again and rerun")
        same = old is not None and old.get("created_at") == pool.created_at
        if raw is not None and not same:
            _remote_call(uri, "remove the old marker", remote.fs.rm_file, (remote / MARKER).path, missing_ok=True)
        kept = old["files"] if same else {}
        send = [name for name in _ordered(files) if kept.get(name) != files[name]]
        marker = {"format_version": FORMAT_VERSION, "created_at": pool.created_at, "files": files,
                  "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if not send and same:
            marker = old
        else:
            _upload_all(local_root, remote, uri, send, files, progress or null_progress)
            _remote_call(uri, f"write {MARKER}", remote.fs.pipe_file, (remote / MARKER).path, _marker_bytes(marker))
            for name in set(old["files"] if old else ()) - set(files):  # e.g. a write-ahead log since checkpointed
                try:
                    remote.fs.rm_file((remote / name).path)
                except OSError:
                    pass
            log.info("published %s to %s (%d of %d files uploaded)", local_root, uri, len(send), len(files))
        _write_marker(local_root, marker)
    return marker


def _local_files(pool) -> dict[str, dict]:
    """``{name: {"bytes", "crc32"}}`` of the index's files: the build's recorded checksums where
    the size still matches, the catalog's (and any unrecorded file's) computed now."""
    out = {}
    for p in sorted(pool.root.iterdir()):
        if not (DATA_FILE.match(p.name) and p.is_file()):
            continue
        size, rec = p.stat().st_size, pool.file_records.get(p.name) or {}
        crc = rec["crc32"] if rec.get("bytes") == size and rec.get("crc32") is not None else crc32_file(p)
        out[p.name] = {"bytes": size, "crc32": int(crc)}
    return out


def _upload_all(local_root: Path, remote: RemotePath, uri: str, names: list[str], files: dict,
                progress: Progress) -> None:
    _remote_call(uri, "create the folder", remote.fs.makedirs, remote.path, exist_ok=True)
    with progress(f"Uploading to {uri}", sum(files[n]["bytes"] for n in names)) as advance:
        for name in names:
            dest = remote / name
            try:
                with open(local_root / name, "rb") as f, dest.fs.open(dest.path, "wb") as out:
                    while block := f.read(_CHUNK):
                        out.write(block)
                        advance(len(block))
            except OSError as e:
                raise RemoteError(f"{uri}: uploading {name} failed ({first_line(e)}); the index there is "
                                  f"not complete until a publish finishes (its {MARKER} is written last)") from None


def _remote_call(uri: str, what: str, fn: Callable, *args, missing_ok: bool = False, **kwargs):
    """``fn(*args, **kwargs)``, an ``OSError`` as ``RemoteError`` (``missing_ok``: a missing file is no error)."""
    try:
        return fn(*args, **kwargs)
    except FileNotFoundError:
        if not missing_ok:
            raise RemoteError(f"{uri}: cannot {what} (not found)") from None
    except OSError as e:
        raise RemoteError(f"{uri}: cannot {what} ({first_line(e)})") from None


# -- mirror --------------------------------------------------------------------------------------

def mirror(uri: str, cache_dir: str | Path | None = None, progress: Progress | None = None) -> Path:
    """The local mirror of the index at ``uri``, brought up to date: its folder.

    Reused while its copy of the marker equals the URI's; otherwise the files whose size or
    checksum differ are downloaded (each checked against the marker before it replaces the old
    one), under the mirror's lock: another process of this machine waits and then reuses them.

    Args:
        cache_dir: the folder of the mirrors (default ``cache_root()``).
        progress: progress hook over the bytes downloaded.

    Raises:
        IndexNotFound: no index at ``uri`` (or a publish that has not finished).
        FormatVersionMismatch: an index of another format version.
        BrokenIndex: a file downloaded does not match its size or checksum in the marker.
        RemoteError: ``uri`` cannot be read.
        InvalidParameter: the protocol's fsspec package is missing, or the cache folder cannot be written.
    """
    uri = index_uri(uri) or uri
    marker = read_marker(uri)
    local = local_dir(uri, cache_dir)
    try:
        local.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidParameter(f"Cannot create the mirror folder {str(local)!r} of {uri} ({first_line(e)}); "
                               f"set {CACHE_ENV} to a folder this user can write") from None
    with lock.waiting(local, MIRROR_LOCK):
        here = _local_marker(local)
        if here != marker:
            marker = read_marker(uri)  # another process may have published or refreshed meanwhile
        if here != marker:
            _refresh(uri, local, marker, here, progress or null_progress)
    return local


def _refresh(uri: str, local: Path, marker: dict, here: dict | None, progress: Progress) -> None:
    """Make the files of ``local`` those of ``marker``, then write its copy of the marker."""
    (local / MARKER).unlink(missing_ok=True)  # a refresh cut short is not taken for a current mirror
    files, old = marker["files"], (here or {}).get("files") or {}
    if f"{CATALOG}.wal" not in files:  # DuckDB would replay a stale log into the new catalog
        (local / f"{CATALOG}.wal").unlink(missing_ok=True)
    need = [n for n in _ordered(files) if not _current(local / n, files[n], old.get(n))]
    remote = RemotePath.from_uri(uri)
    if need:
        with progress(f"Downloading {uri}", sum(files[n]["bytes"] for n in need)) as advance:
            for name in need:
                _download(remote / name, local / name, files[name], uri, advance)
    log.info("mirrored %s in %s (%d of %d files downloaded)", uri, local, len(need), len(files))
    _write_marker(local, marker)


def _current(path: Path, rec: dict, old: dict | None) -> bool:
    """Whether the mirror's ``path`` already holds the file ``rec`` describes: the same size, and the
    same record in the mirror's marker (the file was checked when downloaded) or the same CRC-32."""
    try:
        if path.stat().st_size != rec["bytes"]:
            return False
    except OSError:
        return False
    return old == rec or crc32_file(path) == rec["crc32"]


def _download(src: RemotePath, dest: Path, rec: dict, uri: str, advance: Callable[[int], None]) -> None:
    part = dest.with_name(f".{dest.name}{PART_SUFFIX}")
    crc = size = 0
    try:
        with src.fs.open(src.path, "rb") as f, open(part, "wb") as out:
            while block := f.read(_CHUNK):
                crc, size = zlib.crc32(block, crc), size + len(block)
                out.write(block)
                advance(len(block))
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        part.unlink(missing_ok=True)
        if is_disk_full(e, dest.parent):
            raise disk_full(dest.parent, f"the mirror of {uri}", rec["bytes"]) from None
        if isinstance(e, FileNotFoundError):
            raise RemoteError(f"{src.name} of {uri} is missing though its {MARKER} lists it (a publish in "
                              "progress?); run the command again") from None
        raise RemoteError(f"{uri}: downloading {src.name} failed ({first_line(e)}); run the command again") from None
    if size != rec["bytes"] or crc != rec["crc32"]:
        part.unlink(missing_ok=True)
        raise BrokenIndex(f"{src.name} of {uri}: downloaded {size:,} bytes, crc32 {crc:08x}; its {MARKER} says "
                          f"{rec['bytes']:,} bytes, crc32 {rec['crc32']:08x}: it changed while it was downloaded "
                          "(a publish in progress?) or is damaged; run again, or publish the index again")
    os.replace(part, dest)


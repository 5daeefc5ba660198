"""Writing a command's ``--out`` file: never over an existing file without ``force``, atomically
(a temporary file beside it, fsynced, renamed over it), and a full disk as one line.

``atomic_write`` is the project's one way to write a file whole or not at all: ``sql`` / ``query``
(``queries.formats.write_result``), ``select``, ``weights``, ``sample``, ``encode-text`` and
``report`` write their outputs with it, and ``score`` can write its resumable chunk files with it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from clip_density_index.indexer.diskspace import disk_full, is_disk_full
from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.indexer.layout import CATALOG
from clip_density_index.indexer.swap import BUILD_ID, fsync_dir, pid_alive


def check_out(path: str | Path, force: bool) -> Path:
    """Refuse to overwrite ``path`` unless ``force``; create its parent directories.

    Raises:
        InvalidParameter: ``path`` exists and ``force`` is False, it is a directory, or it is (or,
            through symbolic links, points to) one of an index directory's own files.
        DiskFull: its parent directories cannot be created for lack of space.
    """
    path = Path(path)
    if path.is_dir():
        raise InvalidParameter(f"Output {str(path)!r} is a directory; give a file name")
    index_dir = _index_of_own_file(path)
    if index_dir is not None:  # even with --force: `sql --out idx/catalog.duckdb --force` would overwrite it
        raise InvalidParameter(f"Output {str(path)!r} is a file of the index at {str(index_dir)!r}; "
                               "write the output elsewhere")
    if path.exists() and not force:
        raise InvalidParameter.naming("Output {path!r} already exists; pass {force} to overwrite it", path=str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(path.parent, f"the folder of {str(path)!r}") from None
        raise
    return path


def _index_of_own_file(path: Path) -> Path | None:
    """The index directory when ``path`` (symbolic links followed) names one of its own files (the
    catalog and DuckDB's files beside it, FAISS and ``.npy`` files, the locks, the build record,
    ``skipped.tsv``)."""
    from clip_density_index.indexer.layout import MODALITIES

    real = Path(os.path.realpath(path))
    if not (real.parent / CATALOG).is_file():
        return None
    own = {CATALOG, BUILD_ID, ".lock", ".lock-swap", "skipped.tsv"} | {
        f"{m}{suffix}" for m in MODALITIES for suffix in (".faiss", "_emb.npy", "_rawnorm.npy")}
    return real.parent if real.name in own or real.name.startswith(CATALOG) else None


def _temp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _clean_stale_temps(path: Path) -> None:
    """Remove ``.NAME.tmp-PID`` files beside ``path`` left by writes whose process was killed."""
    pat = re.compile(rf"^\.{re.escape(path.name)}\.tmp-(\d+)$")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for e in entries:
        m = pat.match(e.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            try:
                os.unlink(e.path)
            except OSError:
                pass


def atomic_write(path: Path, write: Callable[[Path], object], what: str | None = None,
                 size: int | None = None) -> None:
    """Call ``write(tmp_path)``, fsync it, rename it onto ``path`` and fsync the folder: ``path``
    is either its old self or the whole new file, whatever happens, and once this returns the new
    file is on disk (a power loss cannot leave an empty file that a resumed run takes as written).

    Args:
        what: what is written, for messages (default: the path).
        size: the bytes the file will take, when known in advance (for the message of a full disk;
            otherwise it names what had been written when the disk filled).

    Raises:
        DiskFull: the filesystem is full: the message names ``path`` and the space needed; an
            existing ``path`` is unchanged.
    """
    path = Path(path)
    _clean_stale_temps(path)
    tmp = _temp_for(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as e:
        if not is_disk_full(e, path.parent):
            raise
        try:
            written = tmp.stat().st_size
        except OSError:
            written = 0
        kept = f"{str(path)!r} is unchanged" if path.exists() else f"{str(path)!r} was not written"
        raise disk_full(path, what or str(path), needed=size or written or None, kept=kept,
                        at_least=size is None) from None
    finally:
        if tmp.exists():
            tmp.unlink()

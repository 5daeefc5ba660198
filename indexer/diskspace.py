"""Full disks: recognise one behind an error from any layer, and say what is needed where.

A full filesystem surfaces as ``OSError`` (errno ENOSPC / EDQUOT) from Python and numpy, as a
DuckDB ``IOException`` / ``TransactionException`` / ``FatalException``, or as a FAISS
``RuntimeError`` that carries only the C library's message. ``is_disk_full`` recognises all of
them: by errno, by message, or (for errors that carry neither) by the filesystem being nearly full
right after the failure.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from clip_density_index.indexer.errors import DiskFull

#: Below this many free bytes right after a failed write, the failure is taken as a full disk.
NEARLY_FULL = 4 << 20

_MESSAGES = ("no space left", "disk full", "not enough space", "quota exceeded", "errno 28", "enospc")


def free_bytes(path: str | Path) -> int | None:
    """Bytes available to this user on the filesystem of ``path`` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def is_disk_full(e: BaseException, path: str | Path | None = None) -> bool:
    """Whether ``e`` (from writing under ``path``) is a full disk or exhausted quota."""
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:  # the error or what caused it
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(cur).lower() for m in _MESSAGES):
            return True
        cur = cur.__cause__ or cur.__context__
    low_level = isinstance(e, (OSError, RuntimeError)) or type(e).__module__.split(".")[0] in ("duckdb", "_duckdb")
    if path is not None and low_level:  # errors that carry no errno: is the filesystem full now?
        free = free_bytes(path)
        return free is not None and free < NEARLY_FULL
    return False


def human(nbytes: float | None) -> str:
    """>>> human(1536), human(3 << 30)
    ('1.5 KiB', '3.0 GiB')
    """
    if nbytes is None:
        return "unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def disk_full(path: str | Path, what: str, needed: int | None = None, kept: str = "",
              at_least: bool = False) -> DiskFull:
    """A ``DiskFull`` naming ``path``, what was being written and the space it needs.

    Args:
        path: where the write failed (a file or a directory).
        what: what was being written, e.g. "the new index".
        needed: bytes the write needs in all (an estimate), when known.
        at_least: ``needed`` is a lower bound (what was written before the disk filled).
        kept: what is intact, e.g. "the previous index at DIR is unchanged".
    """
    free = free_bytes(path)
    need = f"needs {'at least' if at_least else 'about'} {human(needed)}, " if needed else ""
    return DiskFull(f"No space left on the device of {str(path)!r} while writing {what}: it {need}"
                    f"{human(free)} free" + (f"; {kept}" if kept else ""))

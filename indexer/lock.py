"""Advisory locks between processes on one index directory.

A long job that works inside an index (``score`` keeps its resumable chunks in ``DIR/work/``) holds a
shared lock on ``DIR/.lock`` while it runs; ``build-index`` takes the exclusive lock before it
replaces the directory. So a rebuild refuses to pull an index from under a running ``score`` (which
would lose its work), and a ``score`` started while a rebuild swaps the directory in refuses to
start instead of reading half of each.

``waiting`` is a plain exclusive lock that blocks: the processes of one machine that bring an
index's mirror up to date (``indexer.remote``) take turns, so one downloads and the others reuse.

The locks are ``flock(2)`` locks: the kernel drops them when the process ends, however it ends, so
a crashed job never leaves an index locked. Where they are unavailable (no ``fcntl``, a read-only
directory, a filesystem without ``flock``), nothing is locked.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from clip_density_index.indexer.errors import IndexBusy

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
#: Held exclusively by a build that waits at its swap for running jobs: new jobs see it and refuse,
#: so a stream of new ``score`` / ``weights`` runs cannot keep the waiting build out forever.
PENDING_NAME = ".lock-swap"


def _open(root: Path, name: str = LOCK_NAME) -> int | None:
    if fcntl is None or not root.is_dir():
        return None
    try:
        return os.open(root / name, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        log.debug("no lock on %s: %s", root, e)
        return None


def _flock(fd: int, how: int) -> bool:
    """Take the lock without waiting: False when another process holds a conflicting one."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:  # e.g. a filesystem without flock: run unlocked
        log.debug("flock failed: %s", e)
    return True


def _taken(root: Path, name: str = LOCK_NAME) -> bool:
    """Whether another process holds ``root``'s lock file ``name`` exclusively (a probe)."""
    fd = _open(root, name)
    if fd is None:
        return False
    try:
        return not _flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def _swap_pending(root: Path) -> bool:
    return _taken(root, PENDING_NAME)


@contextmanager
def _held(root: Path, exclusive: bool, busy: str, wait: str | None = None) -> Iterator[None]:
    """Hold the lock on ``root``'s lock file (shared or exclusive). When another process holds a
    conflicting one: raise ``IndexBusy(busy)``, or with ``wait`` log that message and block (then
    holding the pending-swap lock meanwhile, which new shared holders respect)."""
    fd = _open(root)
    if fd is None:
        yield
        return
    how = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    pending = None
    try:
        if not _flock(fd, how):
            if wait is None:
                raise IndexBusy(busy)
            log.warning(wait)
            pending = _open(root, PENDING_NAME)
            if pending is not None:
                fcntl.flock(pending, fcntl.LOCK_EX)
            fcntl.flock(fd, how)
        elif not exclusive and _swap_pending(root):  # a finished build waits to swap: let it
            raise IndexBusy(busy)
        yield
    finally:
        os.close(fd)
        if pending is not None:
            os.close(pending)


def using(root: str | Path, job: str):
    """Hold a shared lock on the index at ``root`` while a ``job`` (e.g. "score") works in it.

    Raises:
        IndexBusy: a rebuild is replacing the index right now.
    """
    return _held(Path(root), False, f"Index {str(root)!r} is being replaced by build-index; run {job} "
                                    "again when the build has finished")


def replacing(root: str | Path, wait: bool = False):
    """Hold the exclusive lock on the index at ``root`` (if it exists) while it is replaced.

    Args:
        wait: block until a running ``score`` has finished (a finished build about to swap)
            instead of raising.

    Raises:
        IndexBusy: another process is working in the index (a running ``score``), without ``wait``.
    """
    waiting = (f"Index {str(root)!r} is in use by a running score; the new index is complete and "
               "replaces it when that score has finished (Ctrl-C keeps the old one)") if wait else None
    busy = (f"Index {str(root)!r} is in use by another process (a running score or weights); wait for "
            "it to finish, stop it, or build to another --out")
    return _held(Path(root), True, busy, waiting)


def sole(folder: str | Path, busy: str):
    """Hold the exclusive lock of ``folder`` (e.g. one score run's chunk folder) or raise ``IndexBusy(busy)``."""
    return _held(Path(folder), True, busy)


@contextmanager
def waiting(folder: str | Path, name: str) -> Iterator[None]:
    """Hold the exclusive lock file ``folder/name``, waiting while another process holds it (e.g.
    one process of a node downloading an index's mirror while the others wait for it)."""
    fd = _open(Path(folder), name)
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without flock: run unlocked
            log.debug("flock failed: %s", e)
        yield
    finally:
        os.close(fd)


def in_use(folder: str | Path) -> bool:
    """Whether another process holds ``folder``'s lock (``sole``): e.g. a score working in it."""
    return _taken(Path(folder))

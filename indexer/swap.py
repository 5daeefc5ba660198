"""Crash-safe replacement of an index directory, and recovery from a build killed at any point.

A build writes the new index into ``.NAME.building-TOKEN`` beside ``NAME`` (TOKEN = the builder's
PID and a random suffix) and records TOKEN in the new index's ``.build`` file. ``swap`` then

1. makes the new files durable (fsync),
2. renames ``NAME`` -> ``.NAME.old-TOKEN`` (under the index's exclusive lock, ``indexer.lock``),
3. renames ``.NAME.building-TOKEN`` -> ``NAME``: the commit point,
4. removes ``.NAME.old-TOKEN``.

A process killed anywhere leaves one of these states, which ``recover`` (run by every command that
opens ``NAME``, and by ``build-index`` before it starts) repairs:

- killed before 3 with ``NAME`` moved aside: ``.NAME.old-TOKEN`` is renamed back to ``NAME``
  (the build is rolled back: it never reported success);
- killed after 3: ``.NAME.old-TOKEN`` is garbage, proven by ``NAME/.build`` holding TOKEN, and is
  removed; an ``old`` directory without that proof is kept and named in a warning;
- ``.NAME.building-*`` of a dead process is never the index (``NAME`` or an ``old`` copy is), and
  ``build-index`` removes it.

Directories of a process that is still alive are never touched.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

from clip_density_index.indexer import lock
from clip_density_index.indexer.errors import IndexNotFound
from clip_density_index.indexer.faults import fault_point

log = logging.getLogger(__name__)

#: The file of an index directory that names the build that wrote it (its TOKEN).
BUILD_ID = ".build"


def _pattern(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out.name)}\.(building|old)-((\d+)-[0-9a-f]+)$")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(out: Path) -> list[tuple[str, str, bool, Path]]:
    """(kind, token, owner alive, path) of every ``building`` / ``old`` directory beside ``out``."""
    pat = _pattern(out)
    found = []
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return []
    for e in entries:
        m = pat.match(e.name)
        if m:
            found.append((m.group(1), m.group(2), pid_alive(int(m.group(3))), Path(e.path)))
    return found


def build_id(index: Path) -> str | None:
    try:
        return (index / BUILD_ID).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every regular file directly in ``root``, then ``root`` itself."""
    for p in root.iterdir():
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(root)


def _remove(path: Path) -> None:
    """Remove a directory (or file); a kill part-way leaves a partial ``old`` copy: garbage that
    is still proven by the index's ``.build``, and removed by the next ``recover``."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    first = True
    for p in sorted(path.iterdir()):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except OSError:
                pass
        if first:
            fault_point("swap.removing_old")
            first = False
    shutil.rmtree(path, ignore_errors=True)


def recover(out: str | Path, wait: float = 5.0) -> str | None:
    """Repair what a killed build left beside the index directory ``out``.

    Puts a moved-aside index back when ``out`` is missing, removes ``old`` copies that a completed
    swap proves to be garbage. Returns a note of what was restored, or None.

    Args:
        wait: seconds to wait while a live build is between its two renames (``out`` missing and
            a live ``old`` copy beside it).
    """
    out = Path(os.path.realpath(out))  # a dangling link: the target that a build moved aside
    deadline = time.monotonic() + wait
    note = None
    while True:
        found = leftovers(out)
        if not found:
            return None
        if os.path.lexists(out):
            break
        live = [f for f in found if f[0] == "old" and f[2]]
        dead = [f for f in found if f[0] == "old" and not f[2]]
        if live and time.monotonic() < deadline:  # a build swapping right now
            time.sleep(0.1)
            continue
        if not dead:
            if live:
                raise IndexNotFound(
                    f"Index {str(out)!r} is missing: a build (PID {live[0][1].split('-')[0]}) has moved it aside to "
                    f"{str(live[0][3])!r} and not yet put the new one in place; if that build is no longer "
                    f"running, rename {live[0][3].name} back to {out.name}")
            return None
        dead.sort(key=lambda f: f[3].stat().st_ctime)  # the latest one moved aside
        path = dead[-1][3]
        try:
            os.rename(path, out)
        except OSError as e:
            if os.path.lexists(out):  # another process restored it first
                break
            raise IndexNotFound(f"Index {str(out)!r} is missing; a killed build left it at {str(path)!r} and it "
                                f"cannot be moved back ({e.strerror}): rename it to {str(out)!r}") from None
        fsync_dir(out.parent)
        note = f"restored the index {str(out)!r} that a killed build had moved aside to {path.name}"
        log.warning(note)
        break
    current = build_id(out)
    for kind, token, alive, path in leftovers(out):
        if kind != "old" or alive:
            continue
        if current == token:  # the swap of build TOKEN completed: this is the index it replaced
            log.info("removing %s, the index a completed build replaced", path)
            _remove(path)
        else:
            log.warning("%s holds an index that a killed build moved aside; it is not %s's "
                        "predecessor by its record, so it is kept: remove it by hand if unneeded", path, out)
    return note


def clean_building(out: Path) -> None:
    """Remove the ``building`` directories of builds of ``out`` whose process no longer exists:
    never an index (the index is ``out`` or an ``old`` copy that ``recover`` puts back)."""
    for kind, _token, alive, path in leftovers(out):
        if kind == "building" and not alive:
            log.info("removing the directory of a killed build, %s", path)
            shutil.rmtree(path, ignore_errors=True)


def swap(tmp: Path, out: Path, token: str) -> bool:
    """Move the finished build at ``tmp`` (whose ``.build`` holds ``token``) to ``out``, replacing an
    older index there (True then).

    The older index is moved aside under its exclusive lock (``indexer.lock``): not while a
    ``score`` works in it; one that began during the build is waited for."""
    fsync_tree(tmp)
    old = None
    try:
        if out.exists():
            with lock.replacing(out, wait=True):  # a score that began during the build finishes first
                os.rename(out, out.parent / f".{out.name}.old-{token}")
                old = out.parent / f".{out.name}.old-{token}"
            fsync_dir(out.parent)
            fault_point("swap.after_old_renamed")
        os.rename(tmp, out)
    except BaseException:  # Ctrl-C / SIGTERM or an error between the renames: the old index back
        if old is not None and not os.path.lexists(out):
            os.rename(old, out)
        raise
    fsync_dir(out.parent)
    fault_point("swap.after_new_renamed")
    if old is not None:
        _remove(old)
    return old is not None

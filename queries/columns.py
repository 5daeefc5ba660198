"""A score run's columns as float64 ``.npy`` files in its work folder, opened as memory maps.

``score`` writes every column it computes (the KL columns copied from the chunk files chunk by
chunk, the closed-form columns block by block) into ``<work>/columns/<name>.npy`` and reads them
back by row ranges to store them, so the process holds a block of rows at a time whatever the
pool's size; the page cache holds the rest. ``Columns`` is the mapping ``{name: (n,) float64
memmap}``; ``Columns.new`` creates one column's file and returns its map (the ``column`` hook of
``queries.closed_form``, ``queries.chunks.read_side`` and the exact pass). A file is allocated whole
when it is made, so a full disk is one error naming the folder then, not a crash (SIGBUS) on a
write through the map later.

The files are not resumable state: a run makes them again from its chunk files, and the folder is
removed when the run ends (with the work folder after success; on its own after an error).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import numpy as np
from numpy.lib.format import open_memmap

from clip_density_index.indexer.diskspace import disk_full, is_disk_full

#: The folder of a run's column files, inside its work folder.
FOLDER = "columns"

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Columns(Mapping):
    """The score columns of one run: ``{name: (n,) float64 memmap}`` backed by ``folder/<name>.npy``.

    Use as a context manager: the maps are closed and the folder removed when the block ends.
    Files left in ``folder`` by a run that was killed are removed when it is opened.
    """

    def __init__(self, folder: str | Path, n: int):
        self.folder, self.n = Path(folder), int(n)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self._maps: dict[str, np.memmap] = {}

    def new(self, name: str) -> np.ndarray:
        """A new column ``name``: its file, allocated whole, and its writable (n,) float64 map."""
        if not _NAME.match(name) or name in self._maps:
            raise ValueError(f"score column {name!r} is not a new column name")
        path = self.folder / f"{name}.npy"
        try:
            column = open_memmap(path, mode="w+", dtype=np.float64, shape=(self.n,))
            _allocate(path)
        except OSError as e:
            if is_disk_full(e, self.folder):
                raise disk_full(self.folder, f"the score column {name!r}", needed=8 * self.n,
                                kept="the index and its scores are unchanged") from None
            raise
        self._maps[name] = column
        return column

    def __getitem__(self, name: str) -> np.ndarray:
        return self._maps[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    def close(self) -> None:
        """Drop the maps (the files stay)."""
        self._maps.clear()

    def remove(self) -> None:
        """Drop the maps and delete the folder."""
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Columns":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _allocate(path: Path) -> None:
    """Reserve the disk blocks of the whole file now (``open_memmap`` leaves it sparse), where the
    filesystem can; a full disk raises ``OSError(ENOSPC)`` here."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # no preallocation here: sparse
            raise
    finally:
        os.close(fd)

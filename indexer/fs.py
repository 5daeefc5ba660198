"""Input locations: a local path, or a URI read through fsspec (``s3://``, ``gs://``, ``memory://``, ...).

``input_path(value)`` turns what a user gave into what the readers open:

- a plain path, or a ``file://`` URI, becomes a ``pathlib.Path``: local inputs keep the readers'
  local code path (memory-mapped ``.npy`` files, pyarrow's native parquet reader);
- any other URI becomes a ``RemotePath`` on the fsspec filesystem of its protocol. It offers the
  few ``pathlib`` operations the readers use (``/``, ``name``, ``stem``, ``with_suffix``, ``glob``,
  ``iterdir``, ``is_dir``, ``is_file``, ``exists``, ``stat().st_size``, ``open("rb")``) plus
  ``read_range`` (one ranged read: a single GET on an object store) for streaming array rows.

A protocol whose fsspec implementation is not installed (``s3://`` without s3fs) is one line naming
the URI and the package to install. fsspec itself is imported only when a URI is given (it comes
with the ``ray`` extra).

``memory://`` lives in one process: a Ray worker sees an empty ``memory://`` filesystem, so it is for
tests of the single-process readers only; a cluster reads a shared path or an object store.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Iterator, NamedTuple

from clip_density_index.indexer.errors import InvalidParameter

#: ``scheme://`` at the start of a string (also fsspec chains such as ``simplecache::s3://``).
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*(::[A-Za-z][A-Za-z0-9+.\-]*)*://")


def is_uri(value: str | Path) -> bool:
    """Whether ``value`` is a URI (``scheme://...``) rather than a plain path.

    >>> is_uri("s3://bucket/metadata"), is_uri("memory://pool"), is_uri("metadata/"), is_uri(Path("a"))
    (True, True, False, False)
    """
    return isinstance(value, str) and bool(_URI_RE.match(value))


def input_path(value: "str | Path | RemotePath") -> "Path | RemotePath":
    """The location ``value`` names: a ``Path`` for a plain path or a ``file://`` URI, else a
    ``RemotePath``.

    Raises:
        InvalidParameter: the URI's protocol is unknown, or its fsspec implementation (or fsspec
            itself) is not installed; the message names the URI and the package to install.
    """
    if isinstance(value, (Path, RemotePath)):
        return value
    value = str(value)
    if not is_uri(value):
        return Path(value)
    if value.startswith("file://") and "::" not in value:
        return Path(_file_uri_path(value))
    return RemotePath.from_uri(value)


def _file_uri_path(uri: str) -> str:
    """The local path of a ``file://`` URI (``file:///data/x`` and ``file://localhost/data/x``).

    >>> _file_uri_path("file:///data/pool"), _file_uri_path("file://localhost/data/pool")
    ('/data/pool', '/data/pool')
    """
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise InvalidParameter(f"{uri}: a file:// URI names a path on this machine (file:///path); "
                               f"host {parsed.netloc!r} is not supported")
    return unquote(parsed.path)


def _filesystem(uri: str):
    """``(fsspec filesystem, path within it)`` for ``uri``."""
    try:
        import fsspec.core
    except ImportError:
        raise InvalidParameter(f"{uri}: reading URIs needs fsspec: pip install fsspec "
                               "(or pip install 'clip-density-index[ray]')") from None
    try:
        return fsspec.core.url_to_fs(uri)
    except ImportError as exc:
        raise InvalidParameter(f"{uri}: no filesystem for this URI is installed: {_install_hint(uri, exc)}") from None
    except ValueError as exc:
        if "Protocol not known" not in str(exc):
            raise InvalidParameter(f"{uri}: not a URI fsspec can open ({exc})") from None
        raise InvalidParameter(f"{uri}: unknown protocol {_protocols(uri)[-1]!r} (fsspec knows "
                               "s3, gs, az, hf, http(s), memory, file and others)") from None


def _protocols(uri: str) -> list[str]:
    return [part.split("://", 1)[0] for part in uri.split("::") if part]


def _install_hint(uri: str, exc: Exception) -> str:
    """``pip install PACKAGE`` for the first protocol of ``uri`` whose implementation is missing."""
    from fsspec.registry import known_implementations

    import importlib.util

    for protocol in _protocols(uri):
        known = known_implementations.get(protocol)
        if known is None:
            continue
        package = known["class"].split(".", 1)[0]
        if importlib.util.find_spec(package) is None:
            return f"pip install {package} (fsspec's implementation of {protocol}://)"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class RemoteStat(NamedTuple):
    """What ``RemotePath.stat()`` knows: the size in bytes."""

    st_size: int


class RemotePath:
    """A file or folder on an fsspec filesystem, with the ``pathlib`` operations the readers use.

    ``str()`` is the full URI (``s3://bucket/pool/0.parquet``), as messages name it. Picklable
    (fsspec filesystems are), so a task on another process can open it.
    """

    __slots__ = ("fs", "path")

    def __init__(self, fs, path: str):
        self.fs = fs
        self.path = path.rstrip("/") or "/"

    @classmethod
    def from_uri(cls, uri: str) -> "RemotePath":
        fs, path = _filesystem(uri)
        return cls(fs, path)

    # ------------------------------------------------------------------------------ names (pure)

    def __str__(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.fs == self.fs and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def __truediv__(self, name: str) -> "RemotePath":
        return RemotePath(self.fs, posixpath.join(self.path, str(name)))

    def __reduce__(self):
        return (RemotePath, (self.fs, self.path))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.fs, posixpath.dirname(self.path))

    def with_suffix(self, suffix: str) -> "RemotePath":
        return RemotePath(self.fs, posixpath.splitext(self.path)[0] + suffix)

    # ------------------------------------------------------------------------------ filesystem

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def stat(self) -> RemoteStat:
        return RemoteStat(int(self.fs.size(self.path)))

    def iterdir(self) -> Iterator["RemotePath"]:
        for entry in self.fs.ls(self.path, detail=False):
            entry = entry.rstrip("/")
            if entry != self.path:
                yield RemotePath(self.fs, entry)

    def glob(self, pattern: str) -> Iterator["RemotePath"]:
        """Entries directly in this folder matching ``pattern`` (no ``**``)."""
        for entry in self.fs.glob(posixpath.join(self.path, pattern)):
            yield RemotePath(self.fs, entry)

    def open(self, mode: str = "rb"):
        if mode != "rb":
            raise InvalidParameter(f"{self}: inputs are opened read-only ('rb'), not {mode!r}")
        return self.fs.open(self.path, "rb")

    def read_range(self, start: int, stop: int) -> bytes:
        """Bytes ``start`` to ``stop`` (exclusive) of the file, in one ranged read."""
        if stop <= start:
            return b""
        data = self.fs.cat_file(self.path, start=start, end=stop)
        if len(data) != stop - start:
            raise OSError(f"{self}: read {len(data)} bytes at offset {start}, expected {stop - start} "
                          "(the file is shorter than its header says)")
        return data

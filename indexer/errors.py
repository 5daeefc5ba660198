"""Domain exceptions. The library raises these; ``cli.py`` turns them into click errors.

Every message names the input (path, file and row, query name, value) and what is wrong with it.
"""


class ClipIndexError(Exception):
    """Base class of every error this project raises on purpose."""


class IndexNotFound(ClipIndexError):
    """The index directory does not exist or holds no catalog."""


class FormatVersionMismatch(ClipIndexError):
    """The index was written by a different, incompatible format version."""


class BadInput(ClipIndexError):
    """Input data is malformed: the message names the file (and row where known)."""


class InvalidParameter(ClipIndexError, ValueError):
    """A parameter value is out of range or inconsistent with the index."""


class UnknownQuery(ClipIndexError):
    """A named SQL query does not exist."""


class BudgetTooSmall(ClipIndexError):
    """No FAISS index type fits the memory budget."""


class NotReadOnly(ClipIndexError):
    """A user query tried to modify the catalog through a read-only entry point."""


class BrokenIndex(ClipIndexError):
    """An index directory is damaged: a file it needs is missing or unreadable."""


class IndexBusy(ClipIndexError):
    """Another process is using the index in a way that conflicts with this request."""


class IndexReplaced(ClipIndexError):
    """The index directory was rebuilt (or removed) after this object opened it."""


class DiskFull(ClipIndexError):
    """The filesystem ran out of space (or quota) while writing: the message names the path and
    the space needed; what was there before is intact."""


class MissingStatistic(BrokenIndex, KeyError):
    """A per-modality statistic is missing from the catalog (also a ``KeyError``, which callers
    with a fallback catch)."""

    def __str__(self) -> str:  # KeyError quotes its message
        return str(self.args[0]) if self.args else ""


class TooMuchMemory(InvalidParameter):
    """A request would need more memory than the machine has available (the message names both
    numbers); refused before anything is allocated."""


class QueryError(ClipIndexError):
    """A SQL statement failed to parse or run (unknown table or column, type error, ...)."""

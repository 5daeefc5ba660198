"""Domain exceptions. The library raises these; ``cli.py`` turns them into click errors.

Every message names the input (path, file and row, query name, value) and what is wrong with it.
A message that names a parameter is made with ``naming``, so that each caller reads the name it
wrote: the Python parameter (``top_fraction``) from the library, the flag (``--top-fraction``)
from the command line.
"""

from __future__ import annotations

from typing import Callable


class ClipIndexError(Exception):
    """Base class of every error this project raises on purpose.

    Example:
        >>> e = InvalidParameter.naming("{top_fraction} must be in (0, 1], got {value!r}", value=2)
        >>> str(e)
        'top_fraction must be in (0, 1], got 2'
        >>> e.spelled(lambda name: "--" + name.replace("_", "-"))
        '--top-fraction must be in (0, 1], got 2'
    """

    #: The message with its parameters as ``{name}`` fields, when made by ``naming``.
    template: str | None = None
    #: The other fields of ``template``.
    values: dict = {}

    @classmethod
    def naming(cls, template: str, **values):
        """The error whose message is ``template`` filled with ``values``; every other field of
        ``template`` (``{where}``) is a parameter, spelled by its Python name in ``str(error)``."""
        error = cls(_fill(template, values, str))
        error.template, error.values = template, values
        return error

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message with each parameter spelled by ``spell`` (e.g. the CLI's flag for it)."""
        return str(self) if self.template is None else _fill(self.template, self.values, spell)


class _Fields(dict):
    """``str.format_map`` fields: the values given, and a spelling for every other name."""

    def __init__(self, values: dict, spell: Callable[[str], str]):
        super().__init__(values)
        self.spell = spell

    def __missing__(self, name: str) -> str:
        return self.spell(name)


def _fill(template: str, values: dict, spell: Callable[[str], str]) -> str:
    return template.format_map(_Fields(values, spell))


class IndexNotFound(ClipIndexError):
    """The index directory does not exist or holds no catalog."""


class FormatVersionMismatch(ClipIndexError):
    """The index was written by a different, incompatible format version."""


class BadInput(ClipIndexError):
    """Input data is malformed: the message names the file (and row where known)."""


class InvalidParameter(ClipIndexError, ValueError):
    """A parameter value is out of range or inconsistent with the index."""


class ParameterClash(InvalidParameter):
    """Parameters that do not go together, or one missing that another needs (the command line
    reports it as a usage error, exit code 2)."""


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


class RemoteError(ClipIndexError):
    """An index's copy at a URI could not be read or written (network, permissions): the message
    names the URI and what was kept."""


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

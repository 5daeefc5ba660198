"""Progress hook. The library reports progress through a ``Progress`` callable; the CLI owns the bar.

``progress(label, total)`` returns a context manager that yields an ``advance(n)`` callable.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Protocol


class Progress(Protocol):
    def __call__(self, label: str, total: int | None) -> ContextManager[Callable[[int], None]]: ...


@contextlib.contextmanager
def null_progress(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def tqdm_progress(disable: bool = False) -> Progress:
    """A ``Progress`` that draws tqdm bars on stderr (``disable=True`` silences them)."""

    @contextlib.contextmanager
    def progress(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
        from tqdm import tqdm

        with tqdm(total=total, desc=label, disable=disable, unit_scale=True, leave=False,
                  dynamic_ncols=True) as bar:
            yield bar.update

    return progress

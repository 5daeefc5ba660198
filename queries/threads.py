"""torch threading for many small GEMMs: one torch thread per Python worker thread.

The list-major scans (``queries.estimate.IvfFlatLists``, ``queries.strata``) run thousands of small
matrix products, one per list. torch's intra-op threads only wait on each other at that size (on a
busy 2-core machine a 256 x 141 sort took 50 ms instead of 1 ms), so the lists are dealt instead to
as many Python threads as torch has intra-op threads, each running its GEMMs on one core (torch
releases the GIL inside its kernels).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import torch


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread inside the block; the previous setting is restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def deal_to_threads(work: Callable[[np.ndarray], None], items: np.ndarray, cost: np.ndarray) -> None:
    """Run ``work`` over ``items`` dealt to as many Python threads as torch has intra-op threads.

    The items are sorted by ``cost``, the most expensive first, and dealt round-robin (worker ``w``
    gets ``items[w::workers]``) so that the workers finish together. Every worker runs torch on one
    thread; the caller's thread setting is restored afterwards. ``work`` must write only its own
    items' results (the workers share the output arrays).

    Args:
        work: called once per worker with its share of ``items``.
        items: 1-d array of work items (list numbers).
        cost: the cost of each item, same length as ``items``.
    """
    workers = max(1, min(torch.get_num_threads(), len(items)))
    items = items[np.argsort(-cost, kind="stable")]

    def run(share: np.ndarray) -> None:
        torch.set_num_threads(1)  # a worker thread starts with the process default
        work(share)

    with one_torch_thread():
        if workers == 1:
            run(items)
        else:
            with ThreadPoolExecutor(workers) as pool:
                for done in [pool.submit(run, items[w::workers]) for w in range(workers)]:
                    done.result()

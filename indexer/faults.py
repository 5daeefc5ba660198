"""Fault injection for tests and ``bench/probe.py``: kill the process at a named point.

Set ``CLIP_DENSITY_INDEX_FAULT`` to a point's name (or several, comma-separated) and the process
sends itself SIGKILL when it reaches that point, as a power loss or ``kill -9`` would, with no
cleanup of any kind. Unset (always, outside tests), ``fault_point`` costs two dictionary lookups.

Points (``POINTS``) are named ``stage.moment``; ``build.*`` and ``swap.*`` are in the builder
(``indexer.build``, ``indexer.swap``), ``score.*`` in the engine tasks of ``score``
(``TASK_POINTS``) and in its final store (``STORE_POINTS``, ``indexer.store``).

``CLIP_DENSITY_INDEX_FAULT_ARMED`` names a folder of armed points instead: a point fires when a file
of its name is in that folder, and the process that deletes the file dies, so each armed file kills
one process once (a Ray worker on its first attempt; the retry runs on).
"""

from __future__ import annotations

import os
import signal

ENV = "CLIP_DENSITY_INDEX_FAULT"
ARMED_ENV = "CLIP_DENSITY_INDEX_FAULT_ARMED"

#: Every named point, in the order a build reaches them.
POINTS = (
    "build.after_embeddings",     # embeddings and samples written, no statistics / FAISS yet
    "build.after_faiss",          # FAISS files written, manifest not yet
    "build.before_swap",          # the new index is complete beside DIR
    "swap.after_old_renamed",     # DIR moved aside to .DIR.old-*, the new one not yet in place
    "swap.after_new_renamed",     # the new index is DIR, the old one not yet removed
    "swap.removing_old",          # part of the old index removed
)
#: Points in the engine tasks of ``score`` (``queries.kl_engine``; on a worker, not in a build).
TASK_POINTS = (
    "score.task",                 # a task computed its chunk and has not returned it yet
)
#: Points in the store step of ``score`` (``indexer.store.Store.replace_scores``, in the driver).
STORE_POINTS = (
    "score.store_range",          # a range of rows appended to scores__new, its transaction still open
)


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL when ``CLIP_DENSITY_INDEX_FAULT`` names ``name``."""
    wanted = os.environ.get(ENV)
    if wanted and name in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
    armed = os.environ.get(ARMED_ENV)
    if armed:
        try:
            os.unlink(os.path.join(armed, name))  # one process wins the file
        except OSError:
            return
        os.kill(os.getpid(), signal.SIGKILL)

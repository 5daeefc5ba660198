"""Where the work of a run executes: in this process (``local``) or as tasks on a Ray cluster (``ray``).

Both engines run the same pure task functions (module-level, importable on every node) over a list
of items and yield ``(item, result)`` pairs; the caller (the driver) merges the results and writes
everything that is stored, so an engine never writes to the index. The Ray engine retries a task
whose worker died (``max_retries``), so a lost worker costs only its own items: a retried task
recomputes its item from scratch and its result is yielded once.

    engine = open_engine("ray", address="auto")          # or open_engine("local")
    shared = engine.put(big_read_only_array)             # once per run, not once per task
    for item, result in engine.map(task, items, shared):
        merge(result)

``task(item, shared)`` receives the object given to ``put`` (on Ray: read from the object store;
numpy arrays are not copied).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from clip_density_index.indexer.errors import InvalidParameter

logger = logging.getLogger(__name__)

#: The engines ``--engine`` accepts.
ENGINES = ("local", "ray")
#: Task retries after a lost worker (Ray's own default for tasks is 3).
MAX_RETRIES = 3


def _worker_env() -> dict[str, str]:
    """The environment of Ray tasks that keeps their results those of this process. Ray starts
    workers with ``OMP_NUM_THREADS=1``, and single-threaded OpenBLAS takes another code path for
    small products than two threads or more (which all agree): the synthetic world, generated with
    such products, came out different in the last bits. Tasks run BLAS on 2 threads unless this
    process runs it on 1."""
    asked = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    one = asked == "1" or (asked is None and (os.cpu_count() or 1) == 1)
    return {"OPENBLAS_NUM_THREADS": "1" if one else "2"}


class LocalEngine:
    """Runs every task in this process, in order."""

    name = "local"

    @property
    def workers(self) -> int:
        return 1

    def put(self, obj: Any) -> Any:
        return obj

    def map(self, task: Callable[[Any, Any], Any], items: Iterable[Any], shared: Any = None,
            **resources) -> Iterator[tuple[Any, Any]]:
        for item in items:
            yield item, task(item, shared)

    def close(self) -> None:
        pass


class RayEngine:
    """Runs tasks on a Ray cluster: ``address`` as ``ray.init`` takes it (``"auto"``, ``ray://...``,
    ``host:port``), or None for a local cluster of this machine's CPUs (started here, stopped by
    ``close``)."""

    name = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None,
                 max_retries: int = MAX_RETRIES, max_in_flight: int | None = None):
        try:
            import ray
        except ImportError:
            raise InvalidParameter.naming(
                "{engine} ray needs Ray: pip install 'clip-density-index[ray]' (or pip install ray)"
            ) from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if address is None:
                kwargs["num_cpus"] = num_cpus or os.cpu_count()
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as e:
                raise InvalidParameter.naming("Cannot reach the Ray cluster at {address} {value!r}: {detail}",
                                              value=address, detail=str(e)) from None
            self._started = True
        self.max_retries = max_retries
        self.max_in_flight = max_in_flight

    @property
    def workers(self) -> int:
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)))

    def put(self, obj: Any) -> Any:
        return self._ray.put(obj)

    def map(self, task: Callable[[Any, Any], Any], items: Iterable[Any], shared: Any = None,
            num_cpus: float = 1, num_gpus: float = 0) -> Iterator[tuple[Any, Any]]:
        """Submit ``task(item, shared)`` for every item (at most ``max_in_flight`` at a time, by
        default twice the cluster's CPUs) and yield ``(item, result)`` as tasks finish."""
        ray = self._ray
        remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=self.max_retries,
                            runtime_env={"env_vars": _worker_env()})(task)
        window = self.max_in_flight or 2 * self.workers
        pending: dict[Any, Any] = {}
        todo = iter(items)
        while True:
            for item in todo:
                pending[remote.remote(item, shared)] = item
                if len(pending) >= window:
                    break
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield pending.pop(ref), ray.get(ref)

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


def open_engine(name: str = "local", address: str | None = None, **kwargs) -> LocalEngine | RayEngine:
    """The engine named ``name`` (``"local"`` or ``"ray"``; ``address``: the Ray cluster)."""
    if name == "local":
        if address is not None:
            raise InvalidParameter.naming("{address} needs {engine} ray")
        return LocalEngine()
    if name == "ray":
        return RayEngine(address, **kwargs)
    raise InvalidParameter.naming("Unknown {engine} {value!r}: expected one of {choices}", value=name,
                                  choices=", ".join(ENGINES))


@contextlib.contextmanager
def engine_for(engine: str | LocalEngine | RayEngine, address: str | None = None
               ) -> Iterator[LocalEngine | RayEngine]:
    """The engine of one call: an engine already open, used as it is (its opener closes it), or one
    opened here by name (``open_engine(engine, address)``) and closed when the call ends.

    Raises:
        InvalidParameter: ``address`` with an engine already open, or as ``open_engine`` raises.
    """
    if not isinstance(engine, str):
        if address is not None:
            raise InvalidParameter.naming("{address} applies to an engine given by name ({engine}='ray'), "
                                          "not to an open one")
        yield engine
        return
    opened = open_engine(engine, address)
    try:
        yield opened
    finally:
        opened.close()

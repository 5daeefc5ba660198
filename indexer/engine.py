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

``map_actors`` runs the same tasks on long-lived workers that read ``shared`` once (on Ray: a pool of
Ray Data actors): for a ``shared`` that is costly to rebuild, such as a model, which is then loaded
once per actor and not once per task.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from clip_density_index.indexer.errors import ClipIndexError, InvalidParameter

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

    def map_actors(self, task: Callable[[Any, Any], Any], items: Iterable[Any], shared: Any = None, *,
                   gpus: bool = False) -> Iterator[tuple[Any, Any]]:
        """``map``: this process is the one worker, and ``shared`` is already its one copy."""
        return self.map(task, items, shared)

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

    def map_actors(self, task: Callable[[Any, Any], Any], items: Iterable[Any], shared: Any = None, *,
                   gpus: bool = False) -> Iterator[tuple[Any, Any]]:
        """``task(item, shared)`` for every item on a pool of Ray Data actors (``map_batches`` with a
        callable class, ``_Actor``): each actor reads ``shared`` once, when it starts, and keeps it
        for every item it is given, so a model in ``shared`` is loaded once per actor. ``gpus``:
        one GPU per actor, as many actors as the cluster has GPUs; without GPUs (or ``gpus``
        False), one CPU per actor, as many as the cluster has CPUs. Never more actors than items.

        Yields ``(item, result)`` as items finish, each item once, whatever order Ray Data returns
        them in (results are keyed by the item's position). An actor lost mid-item (its process
        or node) is restarted by Ray Data and the item run again, at most ``max_retries`` times;
        a result that still arrived twice is yielded once."""
        import ray.data

        items = list(items)
        if not items:
            return
        gpu_count = int(self._ray.cluster_resources().get("GPU", 0)) if gpus else 0
        size = min(gpu_count or self.workers, len(items))
        rows = [{"position": i, "item": pickle.dumps(item, protocol=5)} for i, item in enumerate(items)]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))  # one item per block: dealt one by one
        with warnings.catch_warnings():
            # map_batches has no named parameter for max_task_retries: it goes as a Ray remote argument
            # (deprecated, to be removed in Ray 2.64). Without it Ray Data retries an item forever.
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
            ds = ds.map_batches(
                _Actor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=size),
                fn_constructor_args=(task, shared), num_cpus=1, num_gpus=1 if gpu_count else None,
                runtime_env={"env_vars": _worker_env()}, max_task_retries=self.max_retries,
            )
        ds.context.enable_progress_bars = False  # the caller has its own
        ds.context.raise_original_map_exception = True  # another error keeps its type (not UserCodeException)
        seen: set[int] = set()
        with _ray_data_console(logging.CRITICAL):  # an error reaches the caller as an exception
            for row in ds.iter_rows():
                position = int(row["position"])
                if position in seen:
                    continue
                seen.add(position)
                result, error = pickle.loads(row["result"])
                if error is not None:
                    raise error
                yield items[position], result

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


@contextlib.contextmanager
def _ray_data_console(level: int) -> Iterator[None]:
    """Ray Data's console lines below ``level`` held back while it runs (its "progress bars
    disabled" and "execution finished" lines, the traceback of a failed item: the caller reports
    progress and errors); its log file in the Ray session's folder keeps them."""
    handlers = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)]
    levels = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(max(h.level, level))
    try:
        yield
    finally:
        for h, old in zip(handlers, levels):
            h.setLevel(old)


class _Actor:
    """One actor of ``RayEngine.map_actors``: reads ``shared`` once, then runs ``task`` on each item
    of the batches it is given (pickled items, with their positions). Each result goes back pickled
    (any Python object) as ``(result, None)``, or a domain error as ``(None, error)``: raised by the
    driver as it was raised here (Ray Data appends its advice on retrying transient errors to the
    message of an error it carries)."""

    def __init__(self, task: Callable[[Any, Any], Any], shared: Any):
        import ray

        self.task = task
        self.shared = ray.get(shared) if isinstance(shared, ray.ObjectRef) else shared

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        results = [pickle.dumps(self._run(pickle.loads(item)), protocol=5) for item in batch["item"]]
        return {"position": batch["position"], "result": np.array(results, dtype=object)}

    def _run(self, item: Any) -> tuple[Any, ClipIndexError | None]:
        try:
            return self.task(item, self.shared), None
        except ClipIndexError as e:
            return None, e


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

"""The read side of clip-density-index: scores, SQL, selection, importance weights and sampling.

Public API (imported lazily, so ``import queries`` is cheap and never circular)::

    import queries

    pool = queries.open_index("index")                       # indexer.pool.open_index
    queries.score(pool)                                      # fill the scores table (queries.score)
    queries.run_sql(pool, "SELECT count(*) FROM samples")    # read-only SQL -> pyarrow.Table
    queries.list_queries()                                   # named queries in sql/*.sql
    queries.run_query(pool, "top_by_score", column="kl_text", limit=10)
    queries.select(pool, by="kl_text", top_fraction=0.25, out="subset.npy")
    queries.select_keep(pool, ["clipscore:0.3", "kl_text:0.25"])    # pool fractions, intersected
    queries.encode_text("dc-index", ["a photo of food"], out="food.npy")  # the index's open_clip model
    queries.weights(pool, prompt="a photo of food")          # importance weights (SPEC 8)
    queries.sample(pool, prompt="a photo of food", n=100, mode="draw", seed=0)

``score``, ``select`` and ``weights`` are both submodules and functions: each of these submodules
is callable, ``queries.select(...)`` calling ``queries.select.select(...)`` (and so on), whichever
way it was imported; ``from queries.select import select`` works too.
"""

from __future__ import annotations

import importlib
import sys
import types

#: public name -> module that defines it
_API = {
    "open_index": "indexer.pool",
    "run_sql": "queries.sqlrun",
    "run_query": "queries.sqlrun",
    "list_queries": "queries.sqlrun",
    "get_query": "queries.sqlrun",
    "check_read_only": "queries.sqlrun",
    "write_result": "queries.sqlrun",
    "render_table": "queries.sqlrun",
    "select": "queries.select",
    "select_keep": "queries.keep",
    "encode_text": "queries.prompts",
    "weights": "queries.weights",
    "compute_weights": "queries.weights",
    "encode_prompt": "queries.weights",
    "sample": "queries.weights",
    "score": "queries.score",
}
#: submodules whose name is also their main function's name
_CALLABLE_SUBMODULES = ("score", "select", "weights")

__all__ = sorted(_API)


class _CallableModule(types.ModuleType):
    """A submodule that can be called as its main function: ``queries.select(...)``."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


class _Package(types.ModuleType):
    """This package: makes the ``score`` / ``select`` / ``weights`` submodules callable as soon as
    the import system binds them here (``setattr(queries, "select", <module>)``)."""

    def __setattr__(self, name, value):
        if name in _CALLABLE_SUBMODULES and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod = importlib.import_module(module)
    if name in _CALLABLE_SUBMODULES:
        return globals()[name]  # the (callable) submodule, bound by the import
    value = getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))

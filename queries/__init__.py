"""The read side of clip-density-index: scores, SQL, selection, importance weights and sampling.

Public API::

    from clip_density_index import queries

    pool = queries.open_index("index")                       # indexer.pool.open_index
    queries.score(pool)                                      # fill the scores table (queries.scoring)
    queries.run_sql(pool, "SELECT count(*) FROM samples")    # read-only SQL -> pyarrow.Table
    queries.list_queries()                                   # named queries in sql/*.sql
    queries.run_query(pool, "top_by_score", column="kl_text", limit=10)
    queries.select(pool, by="kl_text", top_fraction=0.25, out="subset.npy")   # queries.selection
    queries.select_keep(pool, ["clipscore:0.3", "kl_text:0.25"])    # pool fractions, intersected
    queries.encode_text("dc-index", ["a photo of food"], out="food.npy")  # the index's open_clip model
    queries.weights(pool, prompt="a photo of food")          # importance weights (queries.weighting)
    queries.sample(pool, prompt="a photo of food", n=100, mode="draw", seed=0)

The names are imported on first use (PEP 562), so ``import queries`` does not load torch or faiss.
"""

from __future__ import annotations

import importlib

#: public name -> the module that defines it
_API = {
    "open_index": "clip_density_index.indexer.pool",
    "run_sql": "clip_density_index.queries.sqlrun",
    "run_query": "clip_density_index.queries.sqlrun",
    "list_queries": "clip_density_index.queries.named",
    "get_query": "clip_density_index.queries.named",
    "check_read_only": "clip_density_index.queries.readonly",
    "write_result": "clip_density_index.queries.formats",
    "render_table": "clip_density_index.queries.formats",
    "select": "clip_density_index.queries.selection",
    "select_keep": "clip_density_index.queries.keep",
    "encode_text": "clip_density_index.queries.prompts",
    "weights": "clip_density_index.queries.weighting",
    "compute_weights": "clip_density_index.queries.weighting",
    "encode_prompt": "clip_density_index.queries.prompts",
    "sample": "clip_density_index.queries.weighting",
    "score": "clip_density_index.queries.scoring",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))

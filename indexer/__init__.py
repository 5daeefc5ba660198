"""clip-density-index, build side: sources -> FAISS indexes + a DuckDB catalog."""

__version__ = "0.1.0"

"""clip-density-index, build side and the index it owns: sources -> FAISS indexes + a DuckDB catalog."""

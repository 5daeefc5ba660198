"""clip-density-index: a CLIP-like model as a density-ratio estimator for a whole image-text pool.

Installed as one package, ``clip_density_index``, whose subpackages are this repository's folders:
``indexer`` (the build side and the index it owns), ``queries`` (the read side), ``sql`` (the SQL
files), ``explorer`` (the web page) and the ``cli`` module. See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"

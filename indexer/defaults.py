"""The defaults of the library's parameters that the command line shows in its help.

One place for each value: the library modules take their defaults from here (``queries.score_params``
``DEFAULT_K`` is ``K``), and ``cli.py`` shows them (``show_default`` or its help texts), so a help
text cannot drift from what a run does. Plain values only: importing this module costs nothing,
which keeps ``--help`` fast.
"""

from __future__ import annotations

# -- build-index --------------------------------------------------------------------------------
#: Where an index is written, and the index a read command opens when none is named.
INDEX_DIR = "index"
#: The source of ``build-index`` (``indexer.sources.SOURCES`` lists them all).
SOURCE = "synthetic"
#: Samples of the built-in synthetic world.
SYNTHETIC_N = 100_000
#: Embedding dimension of the synthetic world (CLIP ViT-B/32's).
SYNTHETIC_DIM = 512
#: Geometry of the synthetic world (``indexer.synthetic.GEOMETRIES``).
SYNTHETIC_GEOMETRY = "calibrated"
#: Seed of every seeded step (synthetic world, FAISS training, score samples, draws).
SEED = 0
#: The logit scale a of precomputed embeddings (DataComp, clip-retrieval), whose files do not
#: record it: CLIP's trained a is 100. open_clip sources read their model's own.
LOGIT_SCALE = 100.0
#: The DataComp embedding arrays (``b32_*``) a DataComp source reads.
DATACOMP_ARCH = "b32"
#: The open_clip model of an open_clip source.
OPEN_CLIP_MODEL = "ViT-B-32"
#: Captions-file columns of an open_clip source (image path, caption); clip-retrieval's caption column.
IMAGE_COLUMN = "image"
CAPTION_COLUMN = "caption"
#: The torch device: CUDA when torch sees a GPU, else the CPU (``indexer.device.resolve_device``).
DEVICE = "auto"
#: Memory budget of one modality's FAISS index, as the user writes it (``indexer.choose.parse_memory``).
MAX_MEMORY = "8G"
#: Rows per batch read from a source.
BUILD_BATCH = 65536
#: Rows of each modality whose covariances are computed (a seeded uniform subset on larger pools;
#: 0 = every row). The d x d products are the only super-linear cost of a build: exact ones take
#: ~15 s of a 1M x 512 build on 2 cores, this subset ~2 s (see BENCHMARKS.md for its error).
COV_SAMPLE = 1 << 17
#: Storage type of the kept normalised embeddings: the input's own.
DTYPE = "auto"

# -- score --------------------------------------------------------------------------------------
#: The KL estimator (``queries.score_params.ESTIMATORS``): exact or strata, whichever is faster.
ESTIMATOR = "auto"
#: Pools smaller than this are scored exactly by ``auto`` without timing anything: the exact pass
#: takes seconds there, less than building the strata.
AUTO_EXACT_BELOW = 20_000
#: mimps (SPEC 3.1), tuned by the benchmarks (``bench/``): neighbours per query, and the size m of
#: the uniform tail sample (the default nprobe's dot-product budget counts it: ``indexer.choose``).
K = 256
TAIL_SAMPLE = 2048
#: strata: modelled share of each query's mass scanned exactly. On the default 100k world 0.99
#: (17-18% of the pool scanned) missed the 99% top-25% overlap of kl_image (98.8%); 0.995 (21-23%)
#: met every target on 4,000 held-out rows per side (BENCHMARKS.md).
STRATA_TARGET = 0.995
#: strata: the most of the pool one query scans.
MAX_FRACTION = 0.5
#: The paper's DataComp filter: a softmax over a uniform sample of this fraction of the pool.
PAPER_SAMPLE = 0.002
#: Which scores' sides: both, text (each caption against all images), image.
SIDE = "both"
#: Queries per resumable chunk of ``score``.
SCORE_BATCH = 65536
#: Held-out exact rows per side that every approximate run checks itself on (SPEC 3.2); fewer on
#: small pools. 4,000 rows resolve the top-25% overlap to ~0.1 points.
CHECK = 4000
#: Accuracy targets of an approximate run's held-out check: Spearman, top-25% overlap.
TARGET_SPEARMAN = 0.999
TARGET_OVERLAP = 0.99

# -- weights, sample, select, output ------------------------------------------------------------
#: a', the paper's lowered logit scale for importance weights (from ~100 to 10).
PROMPT_LOGIT_SCALE = 10.0
#: ``sample``: a weighted draw (``draw``) or the highest weights (``top``).
SAMPLE_MODE = "draw"
#: Rows a fraction keeps: floor(F x N) (``paper``: floor(F x N) + 1, as the paper's code).
COUNT_RULE = "floor"
#: Table output: cells cut to this many characters (0: never).
WIDTH = 60

# -- serve --------------------------------------------------------------------------------------
#: The explorer listens on this machine only (it has no authentication).
HOST = "127.0.0.1"
PORT = 8000

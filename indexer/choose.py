"""Choose a FAISS index from the pool size, the dimension and a memory budget (autofaiss-style).

Pure functions: nothing here imports faiss. The keys are FAISS factory strings; the ones this module
produces and understands are

==================  ===============================================================================
``Flat``            exact search (stored wrapped in ``IndexIDMap`` so that ids are ``vec_id``)
``IVF{nlist},Flat`` inverted lists of full float32 vectors: approximate candidates, exact scores
``IVF{nlist},SQ8``  inverted lists of 8-bit scalar-quantised codes: approximate scores
``IVF{nlist},PQ{m}`` inverted lists of m-byte product-quantised codes: approximate scores
``HNSW{M},Flat``    graph over full vectors (exact scores); understood, never chosen automatically
==================  ===============================================================================

Every index uses the inner-product metric (the embeddings are normalised, so it is the cosine).

The consumer is the bulk scorer, which searches *every* pool item against the other modality's
index: n queries. IVF is chosen over HNSW because batched IVF search is fast, its cost in dot
products is predictable (``dots_per_query``) and tunable with one knob (``nprobe``), and it is
cheap to build; HNSW's graph would cost ``8 M`` extra bytes per vector and its search cost is
data-dependent.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from clip_density_index.indexer import defaults
from clip_density_index.indexer.errors import BudgetTooSmall, InvalidParameter

#: Pools up to this size get exact (``Flat``) search when it fits the budget.
FLAT_MAX_N = 20_000
#: k-means wants at least this many training points per centroid (FAISS warns below it).
MIN_POINTS_PER_CENTROID = 39
#: The dot-product budget of the default KL estimate, as a fraction of the exact method's n per query.
SCORE_BUDGET = 0.05
#: The scorer's default tail sample m (``queries.score_params.DEFAULT_TAIL`` is this value).
SCORE_TAIL = defaults.TAIL_SAMPLE
#: At most this many vectors scanned per query by the default nprobe (the 1M wall-time target:
#: 2000 gives nprobe 8 at 1M, whose whole ``score`` took 396 s with a 1000-sample check, BENCHMARKS.md).
MAX_SCAN = 2000
#: Bytes of bookkeeping per inverted list (two ``std::vector`` headers: codes and ids).
_LIST_OVERHEAD = 48

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """Parse a memory size such as ``"4G"`` into bytes.

    Units are binary (K = 1024, M = 1024**2, G = 1024**3, T = 1024**4), case-insensitive, with an
    optional ``B`` or ``iB`` suffix; a bare number is bytes. The result is rounded down to whole
    bytes and must be positive.

    Args:
        text: the size, e.g. ``"4G"``, ``"512M"``, ``"1.5GB"``, ``"100K"``, ``"123456"``.

    Returns:
        The size in bytes.

    Raises:
        InvalidParameter: the text is not a size, or it is zero.

    >>> parse_memory("4G")
    4294967296
    >>> parse_memory("512M")
    536870912
    >>> parse_memory("1.5GB")
    1610612736
    >>> parse_memory("100K")
    102400
    >>> parse_memory("2 GiB")
    2147483648
    >>> parse_memory("123456")
    123456
    >>> parse_memory("4X")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    clip_density_index.indexer.errors.InvalidParameter: Invalid memory size '4X': expected a number with an ...
    """
    m = _MEMORY.match(str(text))
    if not m:
        raise InvalidParameter(
            f"Invalid memory size {text!r}: expected a number with an optional unit K, M, G or T "
            "(e.g. 4G, 512M, 1.5GB)"
        )
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise InvalidParameter(f"Invalid memory size {text!r}: must be more than 0 bytes")
    return value


@dataclass(frozen=True)
class IndexKey:
    """A parsed factory string (one of the forms listed in the module docstring).

    Attributes:
        key: the factory string itself.
        kind: ``"flat"``, ``"ivf"`` or ``"hnsw"``.
        codec: how vectors are stored: ``"Flat"``, ``"SQ8"`` or ``"PQ"``.
        nlist: number of IVF lists (None unless ``kind == "ivf"``).
        pq_m: PQ sub-quantisers, i.e. bytes per code (None unless ``codec == "PQ"``).
        hnsw_m: HNSW neighbours per node (None unless ``kind == "hnsw"``).
    """

    key: str
    kind: str
    codec: str
    nlist: int | None = None
    pq_m: int | None = None
    hnsw_m: int | None = None

    @property
    def exact_scores(self) -> bool:
        """True when searches return exact inner products (full float32 vectors are stored)."""
        return self.codec == "Flat"


_IVF = re.compile(r"^IVF(\d+),(Flat|SQ8|PQ(\d+)(?:x8)?)$")
_HNSW = re.compile(r"^HNSW(\d+)(?:,Flat)?$")


def parse_key(key: str) -> IndexKey:
    """Parse a factory string this module understands.

    >>> parse_key("IVF1024,PQ64")
    IndexKey(key='IVF1024,PQ64', kind='ivf', codec='PQ', nlist=1024, pq_m=64, hnsw_m=None)

    Raises:
        InvalidParameter: the key is not one of ``Flat``, ``IVF{nlist},Flat``, ``IVF{nlist},SQ8``,
            ``IVF{nlist},PQ{m}``, ``HNSW{M},Flat``.
    """
    k = key.strip()
    if k == "Flat":
        return IndexKey(key=k, kind="flat", codec="Flat")
    m = _IVF.match(k)
    if m:
        nlist = int(m.group(1))
        codec = m.group(2)
        pq_m = int(m.group(3)) if m.group(3) else None
        if nlist < 1 or (pq_m is not None and pq_m < 1):
            raise InvalidParameter(f"Invalid index key {key!r}: nlist and m must be at least 1")
        return IndexKey(key=k, kind="ivf", codec="PQ" if pq_m else codec, nlist=nlist, pq_m=pq_m)
    m = _HNSW.match(k)
    if m and int(m.group(1)) >= 2:
        return IndexKey(key=k, kind="hnsw", codec="Flat", hnsw_m=int(m.group(1)))
    raise InvalidParameter(
        f"Unsupported index key {key!r}: expected Flat, IVF{{nlist}},Flat, IVF{{nlist}},SQ8, "
        "IVF{nlist},PQ{m} or HNSW{M},Flat"
    )


def estimate_bytes(key: str, n: int, dim: int) -> int:
    """Estimate the in-memory (and on-disk) size of an index holding n vectors of dimension dim.

    Counted per key (4-byte floats, 8-byte int64 ids):

    - ``Flat``: ``n * (4 dim + 8)``: vectors plus the ``IndexIDMap`` id table.
    - ``IVF{nlist},Flat``: ``n * (4 dim + 8)`` in the lists, ``4 nlist dim`` of centroids and
      48 bytes of bookkeeping per list.
    - ``IVF{nlist},SQ8``: as IVF-Flat with ``dim`` bytes per code, plus ``8 dim`` of ranges.
    - ``IVF{nlist},PQ{m}``: as IVF-Flat with ``m`` bytes per code, plus ``4 * 256 * dim`` of
      PQ codebooks.
    - ``HNSW{M},Flat``: vectors + ids as Flat, plus int32 links (``2 M`` on level 0 and about
      ``M / (M - 1)`` on the upper levels per vector) and 12 bytes of level / offset tables.

    This is the size of the built index. Building needs more for a while: the training sample,
    one float32 chunk being added, and ``std::vector`` growth in the inverted lists.

    Args:
        key: a factory string understood by ``parse_key``.
        n: number of vectors.
        dim: their dimension.

    Returns:
        The estimate in bytes.

    >>> estimate_bytes("Flat", 1000, 512)
    2056000
    >>> estimate_bytes("IVF1024,SQ8", 100_000, 512)
    54150400
    """
    if n < 0 or dim < 1:
        raise InvalidParameter(f"Invalid size n={n}, dim={dim} for {key!r}")
    k = parse_key(key)
    ids = 8 * n
    if k.kind == "flat":
        return 4 * dim * n + ids
    if k.kind == "hnsw":
        m = k.hnsw_m
        links = 4 * (2 * m + m / (m - 1))
        return int(round(n * (4 * dim + links + 4 + 8))) + ids
    assert k.nlist is not None
    ivf = 4 * k.nlist * dim + _LIST_OVERHEAD * k.nlist + ids
    if k.codec == "Flat":
        return ivf + 4 * dim * n
    if k.codec == "SQ8":
        return ivf + dim * n + 8 * dim
    assert k.pq_m is not None
    if dim % k.pq_m:
        raise InvalidParameter(f"Invalid index key {key!r}: PQ m={k.pq_m} must divide dim={dim}")
    return ivf + k.pq_m * n + 4 * 256 * dim


def default_nlist(n: int) -> int:
    """The number of IVF lists for n vectors: a power of two near ``4 sqrt(n)``.

    ``2 ** round(log2(4 sqrt(n)))``, then capped at the largest power of two not above
    ``n / 39`` so that k-means gets 39 training points per centroid (FAISS warns below that);
    at least 1.

    >>> [default_nlist(n) for n in (10_000, 30_000, 100_000, 200_000, 1_000_000, 100_000_000)]
    [256, 512, 1024, 2048, 4096, 32768]
    """
    if n < 1:
        raise InvalidParameter(f"Invalid pool size n={n}: must be at least 1")
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    cap = n // MIN_POINTS_PER_CENTROID
    if cap >= 1:
        nlist = min(nlist, 2 ** int(math.log2(cap)))
    else:
        nlist = 1
    return max(1, nlist)


def candidate_keys(n: int, dim: int) -> list[str]:
    """The keys ``choose_index_key`` tries, best first.

    ``Flat`` (only when ``n <= FLAT_MAX_N``) or ``IVF{nlist},Flat``; then ``IVF{nlist},SQ8``;
    then ``IVF{nlist},PQ{m}`` for every m that divides dim, largest first (m = dim excluded: it
    is no smaller than SQ8).
    """
    nlist = default_nlist(n)
    keys = ["Flat"] if n <= FLAT_MAX_N else [f"IVF{nlist},Flat"]
    keys.append(f"IVF{nlist},SQ8")
    keys += [f"IVF{nlist},PQ{m}" for m in range(dim - 1, 0, -1) if dim % m == 0]
    return keys


def choose_index_key(n: int, dim: int, budget_bytes: int) -> str:
    """Pick the best index key for n vectors of dimension dim that fits in budget_bytes.

    The first of ``candidate_keys(n, dim)`` whose ``estimate_bytes`` fits: exact ``Flat`` for
    small pools (n <= 20,000), otherwise ``IVF{nlist},Flat`` (exact scores for the candidates it
    finds), then ``IVF{nlist},SQ8``, then ``IVF{nlist},PQ{m}`` with the largest m that fits.

    Args:
        n: number of vectors.
        dim: their dimension.
        budget_bytes: memory budget for one index (see ``parse_memory``).

    Returns:
        A FAISS factory string.

    Raises:
        BudgetTooSmall: not even the smallest candidate fits; the message gives n, dim, the budget
            and the smallest estimate.

    >>> choose_index_key(1_000_000, 512, parse_memory("4G"))
    'IVF4096,Flat'
    >>> choose_index_key(1_000_000, 512, parse_memory("1G"))
    'IVF4096,SQ8'
    """
    if n < 1 or dim < 1:
        raise InvalidParameter(f"Invalid size n={n}, dim={dim}: both must be at least 1")
    if budget_bytes <= 0:
        raise InvalidParameter(f"Invalid memory budget {budget_bytes} bytes: must be positive")
    keys = candidate_keys(n, dim)
    for key in keys:
        if estimate_bytes(key, n, dim) <= budget_bytes:
            return key
    smallest = min(keys, key=lambda k: estimate_bytes(k, n, dim))
    need = estimate_bytes(smallest, n, dim)
    raise BudgetTooSmall.naming(
        "No FAISS index for n={n:,} vectors of dim={dim} fits the memory budget of {budget:,} bytes ({budget_h}): "
        "the smallest, {smallest!r}, needs about {need:,} bytes ({need_h}). Raise {max_memory} or pass {index_key}.",
        n=n, dim=dim, budget=budget_bytes, budget_h=_human(budget_bytes), smallest=smallest, need=need,
        need_h=_human(need))


def default_nprobe(key: str, n: int) -> int:
    """Default number of IVF lists to visit per query; 0 for keys without lists (Flat, HNSW).

    Two parts, the larger wins:

    * the base rule ``nprobe = 256 / sqrt(nlist)`` rounded to the nearest power of two (in log
      scale): nlist 256 -> 16, 1024 -> 8, 4096 -> 4, 16384 -> 2;
    * with the pool size n known, the largest nprobe whose scan fits two budgets: the whole
      KL estimate within ``SCORE_BUDGET`` (5%) of the exact method's n dot products per query
      (``nlist`` centroids + the scan + the scorer's default tail of ``SCORE_TAIL`` + 2), and at
      most ``MAX_SCAN`` vectors scanned per query (wall time: it keeps the 1M ``score`` within
      10 minutes on the 2-core reference machine, BENCHMARKS.md).

    Accuracy is bought with nprobe (BENCHMARKS.md section 2): on the calibrated synthetic world at
    100k, IVF1024 with nprobe 8 (3.9% of n) gives Spearman 0.936 on kl_text, nprobe 16 (4.6% of n)
    0.958; this rule picks 19 there (4.9% of n). Clamped to ``[1, nlist]``.

    Args:
        key: the factory string.
        n: number of vectors in the index (0: unknown, the base rule alone).

    >>> [default_nprobe(f"IVF{nlist},Flat", 0) for nlist in (64, 256, 1024, 4096, 16384)]
    [32, 16, 8, 4, 2]
    >>> [default_nprobe(f"IVF{default_nlist(n)},Flat", n) for n in (30_000, 100_000, 300_000, 1_000_000)]
    [16, 19, 13, 8]
    >>> default_nprobe("Flat", 1000)
    0
    """
    k = parse_key(key)
    if k.kind != "ivf":
        return 0
    assert k.nlist is not None
    nprobe = 2 ** round(math.log2(256 / math.sqrt(k.nlist)))
    if n > 0:
        list_size = n / k.nlist
        room = min(SCORE_BUDGET * n - k.nlist - SCORE_TAIL - 2, MAX_SCAN)
        if room >= list_size:
            nprobe = max(nprobe, int(room / list_size))
    return int(min(max(nprobe, 1), k.nlist))


def dots_per_query(key: str, n: int, nprobe: int) -> float:
    """Expected vector-vector inner products one query costs; the cost unit of accuracy-vs-cost
    reports.

    - ``Flat``: ``n`` (every vector).
    - ``IVF{nlist},*``: ``nlist + nprobe * n / nlist``: the query against every centroid, then the
      vectors of ``nprobe`` lists of average size ``n / nlist`` (nprobe is clamped to nlist, as
      FAISS does). For SQ8 / PQ the list part counts code comparisons, each cheaper than a float
      dot product, and the caller's exact rescoring of the k candidates (k more) is not included.

    Args:
        key: the factory string.
        n: vectors in the index.
        nprobe: IVF lists visited (ignored for Flat).

    Raises:
        InvalidParameter: for HNSW, whose cost depends on the data (measure it instead), or a bad
            nprobe.

    >>> dots_per_query("IVF1024,Flat", 100_000, 8)
    1805.25
    """
    k = parse_key(key)
    if k.kind == "flat":
        return float(n)
    if k.kind == "hnsw":
        raise InvalidParameter(
            f"dots_per_query has no closed form for {key!r}: HNSW search cost depends on the data"
        )
    assert k.nlist is not None
    if nprobe < 1:
        raise InvalidParameter(f"Invalid nprobe={nprobe} for {key!r}: must be at least 1")
    return float(k.nlist + min(nprobe, k.nlist) * n / k.nlist)


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"

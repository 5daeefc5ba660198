"""indexer.choose: memory parsing, size estimates, automatic index choice, nprobe and cost rules."""

from __future__ import annotations

import doctest

import pytest

import clip_density_index.indexer.choose as choose
from clip_density_index.indexer.choose import (
    MAX_SCAN,
    SCORE_BUDGET,
    SCORE_TAIL,
    choose_index_key,
    default_nlist,
    default_nprobe,
    dots_per_query,
    estimate_bytes,
    parse_key,
    parse_memory,
)
from clip_density_index.indexer.errors import BudgetTooSmall, InvalidParameter

K, M, G = 1024, 1024**2, 1024**3


def test_doctests():
    result = doctest.testmod(choose)
    assert result.failed == 0 and result.attempted > 10


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4G", 4 * G),
        ("4g", 4 * G),
        ("512M", 512 * M),
        ("512MB", 512 * M),
        ("512MiB", 512 * M),
        ("1.5GB", 3 * G // 2),
        ("100K", 100 * K),
        ("100kb", 100 * K),
        ("2T", 2 * 1024**4),
        ("123456", 123456),
        ("123456B", 123456),
        (" 8 G ", 8 * G),
        (".5K", 512),
    ],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "G", "4X", "-1G", "1.2.3M", "4 GG", "0", "0.0G", "four"])
def test_parse_memory_rejects(text):
    with pytest.raises(InvalidParameter) as e:
        parse_memory(text)
    assert repr(text) in str(e.value)


@pytest.mark.parametrize(
    "n, dim, budget, expected",
    [
        (100, 512, 1 * G, "Flat"),
        (1_000, 512, 1 * G, "Flat"),
        (20_000, 512, 1 * G, "Flat"),
        (20_001, 512, 1 * G, "IVF512,Flat"),
        (30_000, 512, 1 * G, "IVF512,Flat"),
        (100_000, 512, 1 * G, "IVF1024,Flat"),
        (200_000, 768, 4 * G, "IVF2048,Flat"),
        (1_000_000, 512, 4 * G, "IVF4096,Flat"),
        (1_000_000, 512, 1 * G, "IVF4096,SQ8"),
        (1_000_000, 512, 256 * M, "IVF4096,PQ128"),
        (1_000_000, 512, 64 * M, "IVF4096,PQ32"),
        (1_000_000, 768, 128 * M, "IVF4096,PQ96"),
        (10_000, 512, 10 * M, "IVF256,SQ8"),  # Flat (20.6 MB) too big: small IVF, capped nlist
        (100_000_000, 512, 64 * G, "IVF32768,SQ8"),
    ],
)
def test_choose_index_key(n, dim, budget, expected):
    key = choose_index_key(n, dim, budget)
    assert key == expected
    assert estimate_bytes(key, n, dim) <= budget


def test_choose_picks_largest_pq_that_fits():
    n, dim = 1_000_000, 512
    budget = 64 * M
    key = choose_index_key(n, dim, budget)
    m = parse_key(key).pq_m
    bigger = [d for d in range(m + 1, dim) if dim % d == 0]
    assert all(estimate_bytes(f"IVF4096,PQ{d}", n, dim) > budget for d in bigger)


def test_budget_too_small_names_the_numbers():
    with pytest.raises(BudgetTooSmall) as e:
        choose_index_key(1_000_000, 512, 10 * M)
    msg = str(e.value)
    smallest = estimate_bytes("IVF4096,PQ1", 1_000_000, 512)
    for part in ("n=1,000,000", "dim=512", f"{10 * M:,}", "'IVF4096,PQ1'", f"{smallest:,}"):
        assert part in msg


@pytest.mark.parametrize("n, dim, budget", [(0, 512, G), (10, 0, G), (10, 512, 0), (10, 512, -5)])
def test_choose_rejects_bad_sizes(n, dim, budget):
    with pytest.raises(InvalidParameter):
        choose_index_key(n, dim, budget)


def test_estimate_bytes_components():
    n, d = 1000, 64
    assert estimate_bytes("Flat", n, d) == n * (4 * d + 8)
    ivf = 4 * 16 * d + 48 * 16 + 8 * n
    assert estimate_bytes("IVF16,Flat", n, d) == ivf + 4 * d * n
    assert estimate_bytes("IVF16,SQ8", n, d) == ivf + d * n + 8 * d
    assert estimate_bytes("IVF16,PQ8", n, d) == ivf + 8 * n + 4 * 256 * d
    assert estimate_bytes("IVF16,PQ8x8", n, d) == estimate_bytes("IVF16,PQ8", n, d)
    hnsw = estimate_bytes("HNSW32,Flat", n, d)
    assert estimate_bytes("Flat", n, d) + n * 4 * 64 < hnsw < estimate_bytes("Flat", n, d) + n * 4 * 70
    assert estimate_bytes("HNSW32", n, d) == hnsw
    # on a large pool bigger codes cost more, and IVF-Flat more than Flat
    n = 100_000
    assert (
        estimate_bytes("IVF16,PQ8", n, d)
        < estimate_bytes("IVF16,SQ8", n, d)
        < estimate_bytes("Flat", n, d)
        < estimate_bytes("IVF16,Flat", n, d)
    )


@pytest.mark.parametrize(
    "key",
    ["IVF,Flat", "IVF0,Flat", "IVF16,PQ0", "PQ8", "IVF16,SQ4", "HNSW1", "flat", "OPQ16,IVF16,PQ16"],
)
def test_unsupported_keys(key):
    with pytest.raises(InvalidParameter) as e:
        estimate_bytes(key, 1000, 64)
    assert repr(key) in str(e.value)


def test_pq_m_must_divide_dim():
    with pytest.raises(InvalidParameter, match="must divide dim=64"):
        estimate_bytes("IVF16,PQ7", 1000, 64)


def test_parse_key():
    assert parse_key("Flat").exact_scores
    assert parse_key("IVF64,Flat") == choose.IndexKey("IVF64,Flat", "ivf", "Flat", nlist=64)
    assert not parse_key("IVF64,SQ8").exact_scores
    assert parse_key("HNSW32,Flat").hnsw_m == 32 and parse_key("HNSW32,Flat").exact_scores


def test_default_nlist():
    assert default_nlist(100_000) == 1024
    assert default_nlist(1_000_000) == 4096
    assert default_nlist(1) == 1
    assert default_nlist(100) == 2
    for n in (50, 1000, 20_001, 123_456, 10**7):
        nl = default_nlist(n)
        assert nl & (nl - 1) == 0  # power of two
        assert nl * choose.MIN_POINTS_PER_CENTROID <= n or nl == 1
    with pytest.raises(InvalidParameter):
        default_nlist(0)


def test_default_nprobe():
    assert default_nprobe("IVF1024,Flat", 0) == 8  # n unknown: the base rule
    assert default_nprobe("IVF1024,Flat", 100_000) == 19  # 19 lists of ~98 vectors: the 5% budget
    assert default_nprobe("IVF4096,SQ8", 1_000_000) == 8  # 8 lists of ~244 vectors: the scan cap
    assert default_nprobe("IVF256,Flat", 100_000) == 16  # 390 vectors per list: the base rule
    assert default_nprobe("IVF1,Flat", 10) == 1
    assert default_nprobe("IVF2,Flat", 100) == 2  # clamped to nlist
    assert default_nprobe("Flat", 1000) == 0
    assert default_nprobe("HNSW32,Flat", 1000) == 0


@pytest.mark.parametrize("n", [30_000, 100_000, 1_000_000, 10_000_000])
def test_default_cost_is_a_small_fraction_of_n(n):
    key = f"IVF{default_nlist(n)},Flat"
    dots = dots_per_query(key, n, default_nprobe(key, n))
    assert dots < 0.05 * n


@pytest.mark.parametrize("n", [50_000, 100_000, 200_000, 300_000, 1_000_000, 3_000_000])
def test_default_nprobe_spends_the_budget_and_no_more(n):
    from clip_density_index.queries.score_params import DEFAULT_TAIL

    assert SCORE_TAIL == DEFAULT_TAIL
    nlist = default_nlist(n)
    key = f"IVF{nlist},Flat"
    base = default_nprobe(key, 0)
    nprobe = default_nprobe(key, n)
    assert nprobe >= base  # never below the base rule

    def fits(p):
        return dots_per_query(key, n, p) + SCORE_TAIL + 2 <= SCORE_BUDGET * n and p * n / nlist <= MAX_SCAN

    if nprobe > base:
        assert fits(nprobe)
    assert not fits(nprobe + 1)  # the largest that fits


def test_dots_per_query():
    assert dots_per_query("Flat", 200_000, 0) == 200_000
    assert dots_per_query("IVF1024,Flat", 100_000, 8) == 1024 + 8 * 100_000 / 1024
    assert dots_per_query("IVF4096,PQ32", 1_000_000, 4) == 4096 + 4 * 1_000_000 / 4096
    assert dots_per_query("IVF16,Flat", 1000, 64) == 16 + 1000  # nprobe clamped to nlist
    with pytest.raises(InvalidParameter):
        dots_per_query("IVF16,Flat", 1000, 0)
    with pytest.raises(InvalidParameter, match="HNSW"):
        dots_per_query("HNSW32,Flat", 1000, 1)

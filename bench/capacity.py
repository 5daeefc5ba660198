"""The capacity plan's arithmetic (docs/CAPACITY.md): sizes, bytes moved and time of the exact pass
for DataComp-scale pools, from the throughput measured on this project's machine and stated GPU
assumptions. Nothing is measured here; every constant below says where it comes from.

    python -m bench.capacity            # the markdown tables of docs/CAPACITY.md
"""

from __future__ import annotations

SIZES = {"12.8M (small)": 12_800_000, "128M (medium)": 128_000_000, "1.28B (large)": 1_280_000_000}
DIMS = (512, 768)

# ---- measured on the 2-core development machine (AMD EPYC, AVX2), idle, BENCHMARKS.md section 1:
#: pairs (caption, image) per second of the fused exact pass (both sides), whole `score --estimator
#: exact` KL phase: 100k in 215.7 s (4.64e7 /s), 200k in 840 s (4.76e7 /s), d = 512, 2 cores.
PAIRS_PER_S_2CORES_D512 = 4.7e7
#: share of a 512 x 4096 block's time in the GEMM (34.4 of 40.8 ms, `bench.exact_blocks --profile`);
#: the rest (exp, sums, column GEMVs) does not grow with d.
GEMM_SHARE_D512 = 0.84

# ---- stated assumptions (no GPU was lent to this project):
#: dense float16 tensor-core peak of an H100 SXM / H200 (the same compute), and the share a large
#: GEMM reaches in practice.
GPU_FP16_PEAK = 989e12
GPU_GEMM_EFFICIENCY = 0.6
GPU_HBM = {"H100": 3.35e12, "H200": 4.8e12}
#: HBM bytes per pair of the exact pass as written (unfused torch ops on a float32 score block):
#: GEMM out 4, row max 4, subtract 8 + clamp 8 + exp 8, e*s 12, row sums 8, column GEMVs 8.
GPU_BYTES_PER_PAIR = 60

# ---- sizes of what is stored and moved
EMB_BYTES = 2  # float16 embeddings (DataComp's own type; --dtype auto keeps it)
CATALOG_BYTES_PER_SAMPLE = 1200  # DataComp metadata in catalog.duckdb, measured at 10k (README)
SCORE_COLUMNS = 17  # float64 score columns (queries.score_params.SCORE_COLUMNS)
#: the run's column files in its work folder (queries.columns): on disk, read through memory maps
SCORE_FILE_BYTES_PER_SAMPLE = SCORE_COLUMNS * 8
#: rows of the scores table the driver holds while storing it (queries.score_store.STORE_ROWS),
#: vec_id and the 17 columns in one Arrow table
STORE_ROWS = 1 << 18
STORE_RANGE_BYTES = STORE_ROWS * (SCORE_COLUMNS + 1) * 8
PARTIAL_BYTES = 24  # max, s0, s1 (float64) per candidate / per query: queries.exact.Moments
#: the exact pass of both sides keeps the exact mean score of every caption and image (float64,
#: queries.scorers.mean_scores) besides the images' column partials
MEAN_BYTES = 2 * 8
CHUNK_Q = 65_536  # captions per score chunk (score --batch-size default)
KEY_BLOCK = 1 << 20  # images per tile of the Ray exact pass (ray-score branch: queries/kl_engine.py)
CPU_BLOCK = 512 * 4096  # scores per block of the exact pass on CPUs (queries.exact.CPU_CHUNKS)
GPU_BLOCK = 4096 * 65536  # on GPUs (queries.exact.GPU_CHUNKS)


def cpu_pairs_per_core(d: int) -> float:
    per_pair_512 = 2 / PAIRS_PER_S_2CORES_D512  # core-seconds per pair at d = 512
    return 1 / (per_pair_512 * (GEMM_SHARE_D512 * d / 512 + 1 - GEMM_SHARE_D512))


def gpu_pairs(d: int, hbm: float, fused: bool) -> float:
    gemm = 2 * d / (GPU_FP16_PEAK * GPU_GEMM_EFFICIENCY)
    return 1 / (gemm + (0 if fused else GPU_BYTES_PER_PAIR / hbm))


def fmt_bytes(b: float) -> str:
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if b >= size:
            return f"{b / size:,.3g} {unit}"
    return f"{b:,.0f} B"


def fmt_hours(h: float) -> str:
    if h >= 48:
        return f"{h / 24:,.3g} days" if h < 24 * 365 else f"{h / 24 / 365:,.3g} years"
    return f"{h:,.3g} h" if h >= 1 else f"{h * 60:,.3g} min"


def _table(header: list[str], row) -> list[str]:
    """A markdown table: ``header``, then ``row(name, n, d)`` (the cells) for every pool and d."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row(name, n, d))) + " |" for name, n in SIZES.items() for d in DIMS]
    return lines + [""]


def _sizes(name: str, n: int, d: int) -> list:
    return [name, d, fmt_bytes(2 * n * d * EMB_BYTES), fmt_bytes(n * CATALOG_BYTES_PER_SAMPLE),
            fmt_bytes(n * SCORE_FILE_BYTES_PER_SAMPLE), fmt_bytes(n * PARTIAL_BYTES)]


def _hours(name: str, n: int, d: int) -> list:
    pairs = float(n) ** 2
    core_h = pairs / cpu_pairs_per_core(d) / 3600
    h100 = pairs / gpu_pairs(d, GPU_HBM["H100"], False) / 3600
    h200 = pairs / gpu_pairs(d, GPU_HBM["H200"], False) / 3600
    fused = pairs / gpu_pairs(d, GPU_HBM["H200"], True) / 3600
    return [name, d, f"{pairs:.3g}", f"{2 * pairs * d:.3g}", f"{core_h:,.3g}", fmt_hours(core_h / 1000),
            f"{h100:,.3g}", f"{h200:,.3g}", f"{fused:,.3g}", fmt_hours(h200 / 64)]


def _moved(name: str, n: int, d: int) -> list:
    one = n * d * EMB_BYTES
    workers = 64 * one + one
    tiles = (n / CHUNK_Q) * one + (n / KEY_BLOCK) * one
    return [name, d, fmt_bytes(one), fmt_bytes(workers), fmt_bytes(tiles), fmt_bytes(64 * n * PARTIAL_BYTES),
            fmt_bytes(n / CHUNK_Q * n * PARTIAL_BYTES)]


def _memory(name: str, n: int, d: int) -> list:
    cpu = (KEY_BLOCK + CHUNK_Q) * (d * 4 + PARTIAL_BYTES) + 3 * CPU_BLOCK * 4
    gpu = (KEY_BLOCK + CHUNK_Q) * d * EMB_BYTES + 3 * GPU_BLOCK * 4
    exact_pass = n * (PARTIAL_BYTES + MEAN_BYTES)
    return [name, d, fmt_bytes(cpu), fmt_bytes(gpu), fmt_bytes(exact_pass), fmt_bytes(STORE_RANGE_BYTES),
            fmt_bytes(n / 64 * d * EMB_BYTES)]


def tables() -> str:
    out = _table(["pool", "d", "embeddings (2 modalities, float16)", "catalog",
                  "score column files (driver's disk)", "column partials (one set)"], _sizes)
    out += _table(["pool", "d", "pairs n^2", "GEMM FLOPs 2n^2d", "CPU core-hours", "on 1,000 cores",
                   "H100-hours as written", "H200-hours as written", "GPU-hours, fused bound",
                   "on 64 H200 as written"], _hours)
    out += _table(["pool", "d", "one modality", "read, W = 64 workers each streaming the candidates once",
                   "read, tiles of 65,536 captions x 2^20 images, no cache", "column partials to merge, W = 64",
                   "column partials, tiles"], _moved)
    out += _table(["pool", "d", "CPU tile task (RAM)", "GPU tile task (GPU memory)",
                   "driver, exact pass: column partials + mean scores", "driver, store: one range of rows",
                   "per worker, n/64 captions resident (float16)"], _memory)
    out.append("Rates used: CPU " + ", ".join(f"d {d}: {cpu_pairs_per_core(d) / 1e6:.1f}M pairs/s per core" for d in DIMS)
               + "; GPU as written " + ", ".join(f"{g} d {d}: {gpu_pairs(d, bw, False) / 1e9:.0f}G"
                                                for g, bw in GPU_HBM.items() for d in DIMS)
               + " pairs/s; fused bound " + ", ".join(f"d {d}: {gpu_pairs(d, 1, True) / 1e9:.0f}G" for d in DIMS)
               + " pairs/s.")
    return "\n".join(out)


if __name__ == "__main__":
    print(tables())

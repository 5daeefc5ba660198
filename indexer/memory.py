"""Memory a request will need, checked before it is allocated.

A parameter that asks for more than the machine has (``sample -n 50000000 --replace``,
``build-index --dim 100000``) must be refused with the numbers up front, not end in a numpy
``MemoryError`` traceback or the kernel's OOM killer after minutes of work. Callers predict their
peak (``need``) from a measured per-row or per-dimension cost and call ``check``.
"""

from __future__ import annotations

import os
from pathlib import Path

from clip_density_index.indexer.errors import TooMuchMemory

#: Share of the available memory one request may plan to use (the rest: the interpreter, libraries,
#: the page cache of memory-mapped files, estimation error).
USABLE_FRACTION = 0.8


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units.

    >>> format_bytes(512), format_bytes(3 * 2**30), format_bytes(1.5 * 2**40)
    ('512 B', '3.0 GiB', '1.5 TiB')
    """
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_room() -> int | None:
    """Bytes this process's cgroup may still take (limit - usage + reclaimable page cache), or None
    without a limit. A container's limit is often far below the machine's MemAvailable."""
    for limit_p, usage_p, stat_p in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
         "/sys/fs/cgroup/memory/memory.stat"),
    ):
        limit, usage = _read_int(limit_p), _read_int(usage_p)
        if limit is None or usage is None or limit >= 1 << 60:
            continue
        cache = 0
        try:
            for line in Path(stat_p).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key in ("inactive_file", "total_inactive_file") and value.strip().isdigit():
                    cache = int(value)
                    break
        except OSError:
            pass
        return max(0, limit - usage + cache)
    return None


def available_bytes() -> int | None:
    """Memory a new allocation can get without swapping or the OOM killer: the kernel's
    MemAvailable, or less under a cgroup limit; None where neither can be read."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    room = _cgroup_room()
    if room is not None:
        avail = room if avail is None else min(avail, room)
    return avail


def check(need: float, what: str, hint: str = "") -> None:
    """Refuse a request that needs more than ``USABLE_FRACTION`` of the available memory.

    Args:
        need: predicted peak bytes of the request.
        what: the request, as the user wrote it (e.g. "sample -n 50,000,000 --replace").
        hint: what to do instead (appended after a semicolon).

    Raises:
        TooMuchMemory: naming the request, the bytes it needs and the bytes available.
    """
    avail = available_bytes()
    if avail is None or need <= USABLE_FRACTION * avail:
        return
    raise TooMuchMemory(f"{what} would need about {format_bytes(need)} of memory; this machine has "
                        f"{format_bytes(avail)} available" + (f"; {hint}" if hint else ""))


#: Peak bytes of a build per d^2 (d = embedding dimension), whatever the source: the statistics'
#: d x d float64 matrices per modality, their finalisation and their rows in the catalog. Measured
#: with 2,000-sample ArraySource builds: 498 B at d = 1024, 404 B at d = 2048 (synthetic source:
#: 450 / 406 B); rounded up.
BUILD_BYTES_PER_DIM2 = 512
#: Bytes of a build per sample beyond the streamed batches (raw norms, ids, FAISS ids).
BUILD_BYTES_PER_ROW = 32
#: The interpreter, numpy, FAISS, DuckDB and a batch of rows (a d = 512 build peaks at ~300 MiB).
BUILD_BASE_BYTES = 256 * 2**20


def build_bytes(n: int, dim: int) -> int:
    """Predicted peak memory of building an index of ``n`` samples of dimension ``dim``.

    >>> format_bytes(build_bytes(100_000, 100_000))
    '4.7 TiB'
    """
    return int(BUILD_BASE_BYTES + BUILD_BYTES_PER_DIM2 * dim * dim + BUILD_BYTES_PER_ROW * n)

"""The memory of a ``score`` process against the pool's size: what the driver holds per sample.

For each pool size n (a synthetic world, ``cli.py build-index --n N --dim D --index-factory Flat``,
built once per size and kept under OUT) every score command (``--commands``) runs as a child
process, and its memory is read from ``/proc/PID/status`` every ``--every`` seconds:

* ``RssAnon``: the process's own memory (heap, numpy arrays, DuckDB's buffers): what must grow
  if the score columns are held in memory (8 bytes per sample per float64 column);
* ``RssFile``: pages of memory-mapped files it touched (the embeddings; score columns kept as
  files), which the kernel can drop and read again;
* the peak RSS of the whole run (``ru_maxrss``: both kinds together).

The table gives the peaks per size and their growth per sample between consecutive sizes,
``(peak(n2) - peak(n1)) / (n2 - n1)`` bytes: about 8 bytes per float64 column the driver holds in
memory (17 columns and the Arrow copy of the table: ~150-300 bytes), ~0 when it holds a fixed number
of rows. DuckDB's buffer pool is in ``RssAnon`` too: while the store's transaction is open it keeps
the new table's blocks, a cache it bounds by its ``memory_limit`` (80% of RAM by default).
``--duckdb-memory-limit 100MB`` runs the score commands with that limit on every DuckDB connection
(``duckdb.connect`` wrapped in the child; then ``cli.py`` runs as usual), so the growth left is
the product's own. Machine and load vary: read the numbers as indicative, and compare two
checkouts on the same machine at the same time.

Commands (``--commands``, comma-separated):

* ``closed``: ``score DIR --metrics dc,dw,rawnorm,conformity,conformity_est,loglik,clipscore``
  (13 columns, no KL);
* ``paper``: ``score DIR --estimator paper`` (all 17 columns: the KL columns from chunk files, a
  held-out exact check);
* ``mimps``: ``score DIR --estimator mimps`` (FAISS top-k: build with an IVF ``--index-factory``).

``--repo`` runs another checkout's ``cli.py`` (e.g. main's, for an A/B comparison on the same
indexes): the children import ``clip_density_index`` from that checkout (through a link to it in
OUT/pkg-*), whatever is installed. The indexes are built by the first repo that needs them and kept
(``--rebuild`` makes them again).

    python -m bench.driver_memory                                 # 200k, 800k, d 64: closed, paper
    python -m bench.driver_memory --sizes 100000,400000 --commands closed --out /tmp/dm
    python -m bench.driver_memory --repo /work/main --out /tmp/dm  # main's code, same indexes
    python -m bench.driver_memory --duckdb-memory-limit 100MB      # without DuckDB's cache
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import ROOT, command_line, machine, save_json

PY = sys.executable
CLOSED = "dc,dw,rawnorm,conformity,conformity_est,loglik,clipscore"
#: score commands: their extra arguments
COMMANDS = {"closed": ["--metrics", CLOSED], "paper": ["--estimator", "paper"], "mimps": ["--estimator", "mimps"]}
KEYS = ("VmRSS", "RssAnon", "RssFile")
#: ``python -c`` code that runs ``argv[1]`` (a cli.py) with ``argv[2:]``, every DuckDB connection
#: opened with ``memory_limit = argv[0]``.
LIMITED = ("import runpy, sys, duckdb\n"
           "limit, sys.argv = sys.argv[1], sys.argv[2:]\n"
           "real = duckdb.connect\n"
           "def connect(*a, config=None, **kw):\n"
           "    return real(*a, config={**(config or {}), 'memory_limit': limit}, **kw)\n"
           "duckdb.connect = connect\n"
           "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def status(pid: int) -> dict[str, int]:
    """``VmRSS``, ``RssAnon``, ``RssFile`` of ``pid`` in bytes (empty once it has ended)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in KEYS:
                    out[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def run(argv: list[str], env: dict, every: float, log: Path) -> dict:
    """Run one command: wall seconds, exit code, peak RSS (ru_maxrss) and the sampled peaks."""
    peaks = dict.fromkeys(KEYS, 0)
    with open(log, "ab") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for key, value in status(p.pid).items():
                    peaks[key] = max(peaks[key], value)
                done.wait(every)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, code, usage = os.wait4(p.pid, 0)
        done.set()
        sampler.join()
        p.returncode = os.waitstatus_to_exitcode(code)
    return {"argv": [str(a) for a in argv], "rc": p.returncode, "seconds": time.perf_counter() - t0,
            "max_rss": usage.ru_maxrss * 1024, "peak_vmrss": peaks["VmRSS"], "peak_anon": peaks["RssAnon"],
            "peak_file": peaks["RssFile"]}


def package_env(repo: Path, out: Path) -> dict:
    """The environment whose ``clip_density_index`` is ``repo`` (resolved; a link to it under OUT)."""
    link_dir = out / f"pkg-{hashlib.sha1(str(repo).encode()).hexdigest()[:8]}"
    link = link_dir / "clip_density_index"
    link_dir.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(repo, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(link_dir), os.environ.get("PYTHONPATH", "")])}
    env.pop("CLIP_DENSITY_INDEX_FAULT", None)
    where = subprocess.run([PY, "-c", "import clip_density_index as c; print(c.__file__)"], env=env, cwd=out,
                           capture_output=True, text=True).stdout.strip()
    if Path(where).resolve().parent != repo.resolve():
        raise SystemExit(f"clip_density_index resolves to {where!r}, not {repo}: check PYTHONPATH / installs")
    return env


def build(repo: Path, env: dict, n: int, dim: int, factory: str, index: Path, rebuild: bool, log: Path) -> None:
    """``build-index`` of the synthetic world at ``index``, unless it is there already."""
    if (index / "catalog.duckdb").is_file() and not rebuild:
        return
    argv = [PY, str(repo / "cli.py"), "build-index", "--n", str(n), "--dim", str(dim), "--index-factory", factory,
            "--out", str(index), "-q"]
    with open(log, "ab") as err:
        r = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    if r.returncode:
        raise SystemExit(f"build-index --n {n} failed (exit {r.returncode}); see {log}")


def growth(rows: list[dict], key: str) -> list[str]:
    """Bytes per sample between consecutive sizes of one command."""
    return [f"{(b[key] - a[key]) / (b['n'] - a['n']):,.0f}" for a, b in zip(rows, rows[1:])]


def table(results: list[dict]) -> str:
    lines = ["| command | n | wall s | peak RssAnon | peak RssFile | peak RSS (ru_maxrss) | growth RssAnon "
             "B/sample | growth RSS B/sample |", "|---|---|---|---|---|---|---|---|"]
    for command in dict.fromkeys(r["command"] for r in results):
        rows = [r for r in results if r["command"] == command and r["rc"] == 0]
        anon, rss = ["-"] + growth(rows, "peak_anon"), ["-"] + growth(rows, "max_rss")
        for r, ga, gr in zip(rows, anon, rss):
            lines.append(f"| {command} | {r['n']:,} | {r['seconds']:.1f} | {r['peak_anon'] / 2**20:,.0f} MiB | "
                         f"{r['peak_file'] / 2**20:,.0f} MiB | {r['max_rss'] / 2**20:,.0f} MiB | {ga} | {gr} |")
        for r in results:
            if r["command"] == command and r["rc"] != 0:
                lines.append(f"| {command} | {r['n']:,} | failed (exit {r['rc']}) | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="200000,800000", help="pool sizes, comma-separated")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--commands", default="closed,paper", help=f"of {', '.join(COMMANDS)}")
    ap.add_argument("--index-factory", default="Flat", help="the indexes' FAISS factory (mimps: an IVF one)")
    ap.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose cli.py runs (default: this one)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "driver_memory")
    ap.add_argument("--every", type=float, default=0.02, help="seconds between memory samples")
    ap.add_argument("--rebuild", action="store_true", help="build the indexes again")
    ap.add_argument("--duckdb-memory-limit", default=None,
                    help="run the score commands with this DuckDB memory_limit (e.g. 100MB)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    unknown = [c for c in commands if c not in COMMANDS]
    if unknown:
        raise SystemExit(f"--commands: unknown {unknown}; choose from {', '.join(COMMANDS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    repo = args.repo.resolve()
    env = package_env(repo, args.out)
    log = args.out / "driver_memory.log"
    results = []
    for n in sizes:
        index = args.out / f"idx-{n}-d{args.dim}-{args.index_factory.replace(',', '_')}"
        build(repo, env, n, args.dim, args.index_factory, index, args.rebuild, log)
        for command in commands:
            cli = [PY, str(repo / "cli.py")]
            if args.duckdb_memory_limit:
                cli = [PY, "-c", LIMITED, args.duckdb_memory_limit, str(repo / "cli.py")]
            r = run([*cli, "score", str(index), *COMMANDS[command], "-q"], env, args.every, log)
            r.update(command=command, n=n, duckdb_memory_limit=args.duckdb_memory_limit)
            results.append(r)
            print(f"{command} n={n:,}: exit {r['rc']}, {r['seconds']:.1f} s, RssAnon {r['peak_anon'] / 2**20:,.0f} "
                  f"MiB, RSS {r['max_rss'] / 2**20:,.0f} MiB", flush=True)
    print()
    print(f"`{command_line()}` ({repo}; {machine()['date']}, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})")
    print()
    print(table(results))
    save_json({"machine": machine(), "repo": str(repo), "results": results}, args.out / "driver_memory.json")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The Ray engine against the local engine: whole ``build-index`` and ``score`` commands, time and memory.

For each pool size (a synthetic world, ``build-index --n N``) the same commands run

* on the local engine (no ``--engine``: this process's cores), then
* on a Ray cluster of this machine started by the benchmark for each ``--workers`` count
  (``ray start --head --num-cpus W``), with ``--engine ray --address 127.0.0.1:PORT``:

  ``build-index`` (its own index per engine), ``score --estimator exact``, ``score`` (the default
  estimator) and ``score --estimator mimps`` (``--commands`` picks), each a subprocess timed from
  start to exit. Memory is sampled every 0.2 s over the
  whole process tree: the command and its children, plus every process of the Ray cluster (the
  workers are children of the raylet, not of the command). Both sums are given: RSS (shared pages,
  such as Ray's object store, counted in every process that maps them) and PSS (shared pages split
  between the processes: the tree's real footprint). The cluster's idle footprint, measured before
  each command, is included in the Ray rows and also shown on its own.

Each Ray run's scores are compared with the local engine's (largest |difference| over the KL / KLR
columns; the same estimator and seeds should give the same numbers) and a Ray-built index's
embeddings with the local one's. A markdown table is printed (machine, load, commands) and the
raw results written to ``OUT/ray.json``.

    python -m bench.ray                              # 200k and 1M: many hours
    python -m bench.ray --sizes 3000 --workers 1,2   # a quick check
    python -m bench.ray --sizes 200000 --commands exact --workers 2
    python -m bench.ray --sizes 1000000 --commands build,mimps

It needs ``build-index`` / ``score`` with ``--engine ray --address``: without them it stops with one
line before running anything. ``--workers none`` runs the local engine only. The cluster (this
machine only, for the length of the run) is started with ``RAY_AUTH_MODE=disabled`` unless
``RAY_AUTH_MODE`` is set; the commands get the same setting (a driver and its cluster must agree).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, command_line, machine, save_json

PY = sys.executable
COMMANDS = ("build", "exact", "default", "mimps")
#: score commands: their extra arguments
SCORE_ARGS = {"exact": ["--estimator", "exact"], "default": [], "mimps": ["--estimator", "mimps"]}
#: score columns compared between engines (those a run wrote, of these)
KL_COLUMNS = ("kl_text", "klr_text", "kl_image", "klr_image")


class BenchError(Exception):
    """Something this benchmark cannot run with: one line, exit 2."""


# ------------------------------------------------------------------------------ the process tree


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree(roots: list[int]) -> list[int]:
    """``roots`` and all their descendants."""
    kids, out, seen = _children(), [], set()
    todo = [r for r in roots if r]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def footprint(pids: list[int]) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) of ``pids`` in bytes."""
    rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
    pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return rss * 1024, pss * 1024


class Sampler:
    """Peak RSS / PSS sums of the trees under ``roots()``, sampled every ``every`` seconds."""

    def __init__(self, roots, every: float = 0.2):
        self.roots, self.every = roots, every
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = footprint(tree(self.roots()))
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._stop.wait(self.every)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------ the cluster


class LocalCluster:
    """``ray start --head --block`` on this machine with ``workers`` CPUs, in its own process group
    (stopped by signalling that group: never ``ray stop``, which stops every Ray on the machine)."""

    def __init__(self, workers: int, port: int, log: Path, object_store_bytes: int | None = None):
        self.workers, self.port, self.log = workers, port, log
        self.address = f"127.0.0.1:{port}"
        self.temp = Path(f"/tmp/cdi-ray-{os.getpid()}-{port}")  # short: Ray's socket paths are limited
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.setdefault("RAY_AUTH_MODE", "disabled")
        self.object_store_bytes = object_store_bytes
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LocalCluster":
        ray = shutil.which("ray", path=str(Path(PY).parent)) or shutil.which("ray")
        if ray is None:
            raise BenchError("bench.ray: the `ray` command is not installed next to this Python "
                             f"({PY}); pip install 'clip-density-index[ray]'")
        argv = [ray, "start", "--head", "--block", "--num-cpus", str(self.workers), "--num-gpus", "0",
                "--port", str(self.port), "--include-dashboard=false", "--disable-usage-stats",
                "--temp-dir", str(self.temp)]
        if self.object_store_bytes:
            argv += ["--object-store-memory", str(self.object_store_bytes)]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        out.close()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"bench.ray: `ray start --head` exited ({self.proc.returncode}); see {self.log}")
            if b"Ray runtime started" in self.log.read_bytes():
                time.sleep(2)  # the raylet registers its workers' resources right after
                return self
            time.sleep(0.5)
        self.__exit__()
        raise BenchError(f"bench.ray: the Ray head did not start within 180 s; see {self.log}")

    def pids(self) -> list[int]:
        return tree([self.proc.pid]) if self.proc and self.proc.poll() is None else []

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # ray start --block drains and stops its processes
            self.proc.wait(90)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        shutil.rmtree(self.temp, ignore_errors=True)


# ------------------------------------------------------------------------------ commands


def _env(extra: dict | None = None) -> dict:
    """The benchmark's environment for a command (the installed package, ``pip install -e .``)."""
    return {**os.environ, **(extra or {})}


def check_engine_flags(commands: list[str]) -> None:
    """Stop with one line when ``build-index`` / ``score`` have no ``--engine ray --address``."""
    needed = {"build-index"} if "build" in commands else set()
    if set(SCORE_ARGS) & set(commands):
        needed.add("score")
    for cmd in sorted(needed):
        r = subprocess.run([PY, "cli.py", cmd, "--help"], cwd=ROOT, env=_env(), capture_output=True, text=True)
        missing = [f for f in ("--engine", "--address") if f not in r.stdout]
        if r.returncode != 0 or missing:
            raise BenchError(f"bench.ray: `cli.py {cmd}` has no {' / '.join(missing) or 'working --help'} option "
                             f"here, so `{cmd} --engine ray --address ADDR` cannot run: nothing was run "
                             "(use a checkout where it is merged, or --workers none for the local engine only)")


def run(argv: list[str], log: Path, cluster: LocalCluster | None) -> dict:
    """Run one whole command; wall time, exit code, peak RSS / PSS of its tree (and the cluster's)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = _env(cluster.env if cluster else None)
    idle_rss, idle_pss = footprint(cluster.pids()) if cluster else (0, 0)
    with open(log, "ab") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err)
        with Sampler(lambda: [p.pid] + (cluster.pids() if cluster else [])) as s:
            out, _ = p.communicate()
        wall = time.perf_counter() - t0
    report = None
    if "--json" in argv and p.returncode == 0:
        text = out.decode(errors="replace")
        start = text.find("{")
        try:
            report = json.loads(text[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            report = None
    return {"argv": [str(a) for a in argv], "rc": p.returncode, "seconds": wall, "peak_rss": s.peak_rss,
            "peak_pss": s.peak_pss, "cluster_idle_rss": idle_rss, "cluster_idle_pss": idle_pss,
            "report": report, "log": str(log)}


def read_scores(index: Path) -> dict[str, np.ndarray]:
    import duckdb

    con = duckdb.connect(str(index / "catalog.duckdb"), read_only=True)
    try:
        cols = [r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'scores'").fetchall()]
        keep = [c for c in KL_COLUMNS if c in cols]
        if not keep:
            return {}
        rows = con.execute(f"SELECT {', '.join(keep)} FROM scores ORDER BY vec_id").fetchnumpy()
    finally:
        con.close()
    return {c: np.asarray(rows[c], np.float64) for c in keep}


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float | None:
    common = [c for c in a if c in b and len(a[c]) == len(b[c])]
    if not common:
        return None
    return max(float(np.nanmax(np.abs(a[c] - b[c]))) for c in common)


def same_embeddings(x: Path, y: Path, block: int = 1 << 18) -> bool:
    for m in ("image", "text"):
        a, b = np.load(x / f"{m}_emb.npy", mmap_mode="r"), np.load(y / f"{m}_emb.npy", mmap_mode="r")
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if any(not np.array_equal(a[s:s + block], b[s:s + block]) for s in range(0, len(a), block)):
            return False
    return True


def bench_size(n: int, args, out: Path) -> list[dict]:
    rows: list[dict] = []
    engines: list[int | None] = [None] + list(args.workers)
    local_idx = out / f"idx-{n}-local"
    local_scores: dict[str, dict] = {}
    for w in engines:
        tag = "local" if w is None else f"ray{w}"
        idx = local_idx if w is None or "build" not in args.commands else out / f"idx-{n}-{tag}"
        logf = out / "logs" / f"{n}-{tag}.log"
        cluster = LocalCluster(w, args.port, out / "logs" / f"{n}-{tag}-cluster.log", args.object_store) if w else None
        flags = ["--engine", "ray", "--address", cluster.address] if cluster else []
        with cluster if cluster else _nothing():
            if "build" in args.commands or not (idx / "catalog.duckdb").exists():
                argv = [PY, "cli.py", "build-index", "--n", str(n), "--dim", str(args.dim), "--seed", "0",
                        "--out", str(idx), "-q"]
                timed = "build" in args.commands
                r = run(argv + (flags if timed else []), logf, cluster if timed else None)
                if r["rc"] != 0:
                    raise BenchError(f"bench.ray: build-index failed (exit {r['rc']}); see {logf}")
                if timed:
                    row = {"n": n, "command": "build-index", "engine": tag, **r}
                    if w is not None:
                        row["same_embeddings"] = same_embeddings(local_idx, idx)
                    rows.append(row)
                    print(_line(row), flush=True)
            for cmd in (c for c in SCORE_ARGS if c in args.commands):
                argv = [PY, "cli.py", "score", str(idx), "--json", "-q"] + SCORE_ARGS[cmd]
                r = run(argv + flags, logf, cluster)
                row = {"n": n, "command": f"score ({cmd})", "engine": tag, **r}
                if r["rc"] == 0:
                    scores = read_scores(idx)
                    if w is None:
                        local_scores[cmd] = scores
                    else:
                        row["max_diff"] = max_diff(local_scores.get(cmd, {}), scores)
                rows.append(row)
                print(_line(row), flush=True)
        if w is not None and "build" in args.commands and not args.keep:
            shutil.rmtree(idx, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(local_idx, ignore_errors=True)
    return rows


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f}"


def _line(row: dict) -> str:
    return (f"n={row['n']} {row['command']} {row['engine']}: {row['seconds']:.1f} s, rc {row['rc']}, "
            f"peak RSS {_gib(row['peak_rss'])} GiB, PSS {_gib(row['peak_pss'])} GiB")


def table(rows: list[dict]) -> str:
    head = ("| n | command | engine | wall s | peak RSS GiB (tree) | peak PSS GiB (tree) | Ray idle PSS GiB "
            "| estimator | max abs diff vs local | exit |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        rep = r.get("report") or {}
        est = rep.get("estimator") or ""
        diff = r.get("max_diff")
        same = r.get("same_embeddings")
        check = f"{diff:.2e}" if diff is not None else ("embeddings equal" if same else
                                                         ("embeddings DIFFER" if same is False else ""))
        idle = _gib(r["cluster_idle_pss"]) if r["engine"] != "local" else "-"
        out.append(f"| {r['n']:,} | {r['command']} | {r['engine']} | {r['seconds']:.1f} | {_gib(r['peak_rss'])} "
                   f"| {_gib(r['peak_pss'])} | {idle} | {est} | {check} | {r['rc']} |")
    return "\n".join(out)


def _workers(text: str) -> list[int]:
    if text.strip().lower() in ("", "none", "0"):
        return []
    ws = [int(v) for v in text.split(",")]
    if any(w < 1 for w in ws):
        raise argparse.ArgumentTypeError(f"--workers: counts must be >= 1, got {text!r}")
    return ws


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200000,1000000", help="comma-separated pool sizes")
    ap.add_argument("--workers", type=_workers, default=[1, 2],
                    help="comma-separated Ray CPU counts (one cluster each), or 'none' (default 1,2)")
    ap.add_argument("--commands", default=",".join(COMMANDS),
                    help=f"comma-separated subset of {', '.join(COMMANDS)} (default all)")
    ap.add_argument("--dim", type=int, default=512, help="embedding dimension of the synthetic world")
    ap.add_argument("--port", type=int, default=6391, help="port of the benchmark's Ray head")
    ap.add_argument("--object-store", type=int, default=None, help="Ray object store bytes (default Ray's)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "ray", help="indexes, logs, ray.json")
    ap.add_argument("--keep", action="store_true", help="keep the indexes")
    args = ap.parse_args(argv)
    args.commands = [c for c in args.commands.split(",") if c]
    bad = [c for c in args.commands if c not in COMMANDS]
    if bad or not args.commands:
        ap.error(f"--commands: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(COMMANDS)}")
    sizes = [int(v) for v in args.sizes.split(",")]
    try:
        if args.workers:
            check_engine_flags(args.commands)
        args.out.mkdir(parents=True, exist_ok=True)
        info = {"machine": machine(), "command": command_line(), "load_before": os.getloadavg()}
        rows: list[dict] = []
        for n in sizes:
            rows += bench_size(n, args, args.out)
            save_json({**info, "rows": rows}, args.out / "ray.json")
        info["load_after"] = os.getloadavg()
        save_json({**info, "rows": rows}, args.out / "ray.json")
    except BenchError as e:
        print(str(e), file=sys.stderr)
        return 2
    m = info["machine"]
    print(f"\nMachine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU {m['gpu'] or 'none'}; "
          f"commit {m['commit']}; {m['date']}; load average before {info['load_before'][0]:.1f}, after "
          f"{info['load_after'][0]:.1f}")
    print(f"Command: {info['command']}")
    print("Ray rows: a cluster of this machine (`ray start --head --num-cpus W`); the tree's memory includes "
          "the cluster's processes. Local rows: no --engine.\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The fault probe, rerunnable: kills at named and random points of ``build-index`` and
``score``, byte flips in every data file and the catalog, and a full disk (a small tmpfs, where one
can be mounted), each on a small synthetic index, through the CLI as a user runs it.

Every trial ends in one outcome:

- held: the command (or the next one) gave the right result: an index that opens, with the old
  or the new contents, scores equal to a clean run's;
- clear error: exit 1 and one ``Error:`` line, nothing wrong stored (the old index intact);
- wrong result: exit 0 with numbers that differ from a clean run's, or an index lost or damaged;
- traceback: a Python traceback.

    python -m bench.probe                 # ~4 minutes on 2 cores
    python -m bench.probe --trials 5 --seed 1
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import duckdb
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clip_density_index.indexer.faults import ENV, POINTS  # noqa: E402

CLI = [sys.executable, str(ROOT / "cli.py")]
N, DIM = 2000, 32
BUILD = ["--n", str(N), "--dim", str(DIM), "--index-factory", "IVF16,Flat", "-q"]
SCORE = ["--metrics", "kl,dw,rawnorm", "--batch-size", "256", "-q"]


def cli(*args, fault=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if fault:
        env[ENV] = fault
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout)


def popen(*args):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    return subprocess.Popen(CLI + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def scores(index: Path) -> dict | None:
    try:
        with duckdb.connect(str(index / "catalog.duckdb"), read_only=True) as con:
            rows = con.execute("SELECT * FROM scores ORDER BY uid").fetchnumpy()
    except Exception:
        return None
    return {k: np.asarray(v) for k, v in rows.items() if k != "uid"}


def same(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None or a.keys() != b.keys():
        return False
    return all(np.allclose(a[k].astype(float), b[k].astype(float), rtol=1e-6, atol=1e-6, equal_nan=True)
               for k in a)


def classify_error(r) -> str:
    if "Traceback" in r.stderr:
        return "traceback"
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    return "clear error" if r.returncode == 1 and len(errors) == 1 else "traceback"


def n_of(index: Path) -> int | None:
    r = cli("sql", index, "SELECT n FROM manifest", "--format", "csv")
    if r.returncode != 0:
        return None
    return int(r.stdout.split()[1])


class Probe:
    def __init__(self, work: Path, trials: int, rng: random.Random):
        self.work, self.trials, self.rng = work, trials, rng
        self.rows: list[tuple[str, str, str, str]] = []  # (kind, trial, outcome, detail)
        self.pristine = work / "pristine"
        r = cli("build-index", *BUILD, "--out", self.pristine)
        assert r.returncode == 0, r.stderr
        r = cli("score", self.pristine, *SCORE)
        assert r.returncode == 0, r.stderr
        self.golden = scores(self.pristine)
        t0 = time.monotonic()
        cli("build-index", *BUILD, "--out", work / "timing")
        self.build_s = time.monotonic() - t0
        shutil.rmtree(work / "timing")
        t0 = time.monotonic()
        cli("score", self.pristine, *SCORE)
        self.score_s = time.monotonic() - t0

    def fresh(self, name: str) -> Path:
        d = self.work / name
        if d.exists():
            shutil.rmtree(d)
        for p in self.work.glob(f".{name}.*"):
            shutil.rmtree(p, ignore_errors=True)
        shutil.copytree(self.pristine, d)
        return d

    def add(self, kind, trial, outcome, detail=""):
        self.rows.append((kind, trial, outcome, detail))
        print(f"  {kind:<14} {trial:<34} {outcome:<12} {detail[:90]}", flush=True)

    # -- kills --------------------------------------------------------------------------------
    def after_build_kill(self, index: Path) -> tuple[str, str]:
        """The next command on a killed build's --out: held when the index opens with the old
        contents (scores equal to the clean run's) or the new ones (n + 1 samples)."""
        r = cli("info", index)
        if r.returncode != 0:
            return classify_error(r) if "Traceback" in r.stderr else "wrong result", "index lost: " + r.stderr[-120:]
        n = n_of(index)
        if n == N and same(scores(index), self.golden):
            return "held", "old index with its scores"
        if n == N + 1:
            return "held", "new index"
        return "wrong result", f"n = {n}, scores {'equal' if same(scores(index), self.golden) else 'differ'}"

    def build_kills(self):
        for point in POINTS:
            index = self.fresh("b")
            r = cli("build-index", *BUILD, "--n", N + 1, "--out", index, fault=point)
            outcome, detail = self.after_build_kill(index)
            self.add("build kill", f"at {point}", outcome, f"rc {r.returncode}; {detail}")
        for i in range(self.trials):
            index = self.fresh("b")
            delay = self.rng.uniform(0.5, self.build_s + 0.5)
            p = popen("build-index", *BUILD, "--n", N + 1, "--out", index)
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            p.communicate()
            outcome, detail = self.after_build_kill(index)
            self.add("build kill", f"random, after {delay:.2f} s", outcome, detail)

    def score_kills(self):
        for i in range(self.trials):
            index = self.fresh("s")
            with duckdb.connect(str(index / "catalog.duckdb")) as con:
                con.execute("DROP TABLE scores")
            delay = self.rng.uniform(0.5, self.score_s + 0.5)
            p = popen("score", index, *SCORE)
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            p.communicate()
            r = cli("score", index, *SCORE)
            if r.returncode != 0:
                self.add("score kill", f"random, after {delay:.2f} s", classify_error(r), r.stderr.strip()[-90:])
                continue
            ok = same(scores(index), self.golden)
            self.add("score kill", f"random, after {delay:.2f} s", "held" if ok else "wrong result",
                     "rerun equals a clean run" if ok else "rerun differs")

    # -- flips --------------------------------------------------------------------------------
    def flips(self):
        files = ["image_emb.npy", "text_emb.npy", "image.faiss", "text.faiss", "image_rawnorm.npy",
                 "text_rawnorm.npy", "catalog.duckdb"]
        for name in files:
            for i in range(self.trials):
                index = self.fresh("f")
                path = index / name
                size = path.stat().st_size
                off = self.rng.randrange(0, max(1, size - 64))
                with open(path, "r+b") as f:
                    f.seek(off)
                    data = bytearray(f.read(64))
                    f.seek(off)
                    f.write(bytes(b ^ 0xFF for b in data))
                r = cli("score", index, *SCORE)
                v = cli("info", index, "--verify")
                caught = "verify caught it" if v.returncode == 1 and "Traceback" not in v.stderr else \
                    f"verify rc {v.returncode}"
                if r.returncode == 0:
                    ok = same(scores(index), self.golden)
                    self.add("flip 64 bytes", f"{name} @ {off}", "held" if ok else "wrong result", caught)
                else:
                    self.add("flip 64 bytes", f"{name} @ {off}", classify_error(r),
                             (r.stderr.strip().splitlines() or [""])[-1][:60] + "; " + caught)

    # -- full disk ----------------------------------------------------------------------------
    def full_disk(self):
        fs = self.work / "fs"
        fs.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(fs)], capture_output=True, text=True)
        if r.returncode:
            self.add("full disk", "tmpfs", "skipped", f"cannot mount a tmpfs: {r.stderr.strip()[:60]}")
            return
        try:
            for i in range(self.trials):
                for p in list(fs.iterdir()):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                index = fs / "idx"
                shutil.copytree(self.pristine, index)
                st = os.statvfs(fs)
                free = st.f_bavail * st.f_frsize
                leave = self.rng.randrange(0, 3 << 20)
                with open(fs / "filler", "wb") as f:
                    f.write(b"\0" * max(0, free - leave))
                for what, args in (("build-index", ["build-index", *BUILD, "--n", N + 1, "--out", index]),
                                   ("score", ["score", index, *SCORE, "--seed", "1"]),
                                   ("sql --out", ["sql", index, "SELECT * FROM samples", "--out", fs / "rows.csv"])):
                    before = scores(index)
                    r = cli(*args)
                    if r.returncode == 0:
                        outcome = "held"
                    else:
                        outcome = classify_error(r)
                        if outcome == "clear error" and what != "score" and not same(scores(index), before):
                            outcome = "wrong result"
                    self.add("full disk", f"{what}, {leave >> 10} KiB free", outcome,
                             (r.stderr.strip().splitlines() or [""])[-1][:90])
        finally:
            subprocess.run(["umount", "-l", str(fs)], capture_output=True)

    def table(self) -> str:
        by = defaultdict(Counter)
        for kind, _, outcome, _ in self.rows:
            by[kind][outcome] += 1
        cols = ["held", "clear error", "wrong result", "traceback", "skipped"]
        lines = ["| fault | trials | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
        for kind, c in by.items():
            lines.append(f"| {kind} | {sum(c.values())} | " + " | ".join(str(c[k]) for k in cols) + " |")
        total = Counter()
        for c in by.values():
            total.update(c)
        lines.append(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[k]) for k in cols) + " |")
        return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3, help="random trials per kind (and flips per file)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="probe-"))
    t0 = time.monotonic()
    try:
        probe = Probe(work, args.trials, random.Random(args.seed))
        print(f"index: {N} synthetic samples, dim {DIM}, IVF16,Flat; build {probe.build_s:.1f} s, "
              f"score {probe.score_s:.1f} s", flush=True)
        probe.build_kills()
        probe.score_kills()
        probe.flips()
        probe.full_disk()
        print()
        print(probe.table())
        print(f"\n{len(probe.rows)} trials in {time.monotonic() - t0:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Shared helpers of the benchmarks: synthetic data, machine description, child-process timing."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
A = 100.0  # logit scale of the synthetic world
#: Every synthetic world the accuracy tables cover, in table order: the calibrated / flat / clustered
#: worlds and the heavy-tailed ones (mixture, duplicates, templates, hubs, heavy).
#: Defined once in indexer/synthetic.py (numpy and pyarrow only; no torch or faiss).
from clip_density_index.indexer.synthetic import GEOMETRIES as WORLDS  # noqa: E402


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    gpu = None
    try:
        import torch
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "gpu": gpu,
            "python": platform.python_version(), "platform": platform.platform(), "commit": commit,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def world(n: int, geometry: str = "calibrated", seed: int = 0, dim: int = 512, normalise: bool = True):
    """(meta, image, text) of the first n samples of the synthetic world, float32 (unit rows when
    ``normalise``); generated block by block to keep peak memory at about the result's size."""
    from clip_density_index.indexer.synthetic import SyntheticWorld

    w = SyntheticWorld(seed=seed, dim=dim, geometry=geometry)
    image = np.empty((n, dim), np.float32)
    text = np.empty((n, dim), np.float32)
    metas = []
    step = 65536
    for s in range(0, n, step):
        c = min(step, n - s)
        meta, im, tx = w.sample(s, c)
        if normalise:
            im = im / np.linalg.norm(im, axis=1, keepdims=True)
            tx = tx / np.linalg.norm(tx, axis=1, keepdims=True)
        image[s:s + c], text[s:s + c] = im, tx
        metas.append(meta.select(["uid", "caption"]))
    import pyarrow as pa
    return pa.concat_tables(metas), image, text


def run_child(argv: list[str], log: Path | None = None, stdout: Path | None = None) -> dict:
    """Run a child process; wall seconds, peak RSS (ru_maxrss of the child, bytes), exit code.
    stderr (and stdout unless ``stdout`` is given) go to ``log``; stdout's text is returned."""
    t0 = time.perf_counter()
    err = open(log, "ab") if log else subprocess.DEVNULL
    out = open(stdout, "wb") if stdout else err
    p = subprocess.Popen(argv, stdout=out, stderr=err if log else subprocess.DEVNULL, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    for f in {id(err): err, id(out): out}.values():
        if f is not subprocess.DEVNULL:
            f.close()
    rc = os.waitstatus_to_exitcode(status)
    res = {"argv": [str(a) for a in argv], "seconds": wall, "peak_rss_bytes": ru.ru_maxrss * 1024, "rc": rc,
           "user_s": ru.ru_utime, "sys_s": ru.ru_stime}
    if stdout:
        res["stdout"] = Path(stdout).read_text(errors="replace")
    return res


def save_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_default))
    tmp.replace(path)


def _default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)

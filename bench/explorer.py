"""Server time of the explorer's views on an existing index (the target: a gallery page in
<= 300 ms p50 at 1M; a prompt as fast as ``sample --mode top``).

    python -m bench.explorer INDEX [--repeat 7] [--prompt "a photo of a dog"]

Each view is requested through Starlette's TestClient (in process: the time is the app's, with no
network); the first request of each view is reported apart (it fills the caches: decile bounds,
histograms, correlations)."""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("index")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--prompt", default="a photo of a dog")
    ap.add_argument("--column", default=None)
    a = ap.parse_args(argv)

    from starlette.testclient import TestClient

    from clip_density_index import queries
    from clip_density_index.explorer.app import create_app

    t0 = time.perf_counter()
    app = create_app(a.index)
    print(f"open + overview: {time.perf_counter() - t0:.3f} s")
    col = a.column or app.state.explorer.ov.columns[0]
    views = {
        "gallery top p0": f"/?column={col}",
        "gallery top p40": f"/?column={col}&page=40",
        "gallery bottom": f"/?column={col}&order=bottom",
        "gallery decile 5": f"/?column={col}&order=decile&decile=5",
        "gallery decile 5 p20": f"/?column={col}&order=decile&decile=5&page=20",
        "gallery random d3": f"/?column={col}&order=random&decile=3&seed={{i}}",
        "plots": f"/plots?x={col}&y={app.state.explorer.ov.columns[-1]}",
        "selection": f"/select?by={col}&fraction=0.25",
        "selection .npy": f"/select.npy?by={col}&fraction=0.25",
    }
    if app.state.explorer.ov.can_encode:
        views["prompt"] = "/prompt?prompt=" + a.prompt.replace(" ", "+")
    with TestClient(app, base_url="http://127.0.0.1") as c:
        print(f"{'view':24s} {'first':>8s} {'p50':>8s} {'max':>8s}  (seconds)")
        for name, url in views.items():
            times = []
            for i in range(a.repeat + 1):
                t = time.perf_counter()
                r = c.get(url.replace("{i}", str(i)))
                times.append(time.perf_counter() - t)
                assert r.status_code == 200, (url, r.status_code, r.text[:200])
            rest = times[1:]
            print(f"{name:24s} {times[0]:8.3f} {statistics.median(rest):8.3f} {max(rest):8.3f}")
    if app.state.explorer.ov.can_encode:
        pool = queries.open_index(a.index)
        times = []
        for _ in range(a.repeat):
            t = time.perf_counter()
            queries.sample(pool, a.prompt, n=24, mode="top")
            times.append(time.perf_counter() - t)
        print(f"{'sample --mode top (API)':24s} {'':8s} {statistics.median(times):8.3f} {max(times):8.3f}")


if __name__ == "__main__":
    main()

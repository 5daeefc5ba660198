"""The explorer web app (``cli.py serve INDEX``): a read-only Starlette app over one index.

Routes (all GET except the embedding upload):

* ``/``: gallery (``column``, ``order`` top|bottom|decile|random, ``decile`` 1-10, ``page``, ``seed``)
* ``/plots``: histograms, a scatter of two columns (``x``, ``y``), the correlation table
* ``/prompt``: top samples and weight distribution for ``prompt`` (POST: an uploaded ``.npy``)
* ``/select``: counts and examples of a selection (``by``, ``fraction``, ``where``, ``lowest``);
  ``/select.npy``: the DataComp subset file ``select --out X.npy`` writes
* ``/image/VEC_ID``: the image the catalog records for that sample (``queries.explore.image_file``)
* ``/picture/VEC_ID.svg``: the generated picture of a sample without an image
* ``/static/...``: the stylesheet shipped in this package

Every parameter is parsed and range-checked here; columns are checked against the index's score
columns; SQL only runs through ``queries.explore`` (read-only reader, bound values). Errors are a
page with one line (400 for bad input, 404, 500 without a traceback). The Host header must name
the address served (DNS rebinding), and responses carry a Content-Security-Policy that lets the
page load only its own stylesheet, its own images and (for pools with URLs) remote images.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from clip_density_index.explorer import pages
from clip_density_index.explorer.svg import histogram_svg, scatter_svg
from clip_density_index.indexer.errors import BadInput, ClipIndexError, InvalidParameter, NotReadOnly, UnknownQuery
from clip_density_index.indexer.pool import open_index
from clip_density_index.queries import explore
from clip_density_index.queries.sqlrun import QueryError

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
#: Pools up to this size get the correlation table on the plots page at once; larger ones on request
#: (it ranks every score column: ~45 s at 300k samples on 2 busy cores).
CORR_INLINE_MAX = 200_000
#: Pools up to this size get a prompt's weight distribution with its top samples; larger ones on
#: request (it is one pass over every image, as `weights`; the top samples alone cost what
#: `sample --mode top` costs).
DIST_INLINE_MAX = 200_000
#: Longest text parameter accepted (prompt, where).
MAX_TEXT = 2000
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data: http: https:; form-action 'self'; "
       "base-uri 'none'; frame-ancestors 'none'")


class Explorer:
    """The state of one served index: the opened pool, a lock (one DuckDB reader, numpy work) and
    caches of what does not change while the index does not (overview, decile bounds, plots)."""

    def __init__(self, index_dir: str | Path):
        self.pool = open_index(index_dir)
        self.lock = threading.Lock()
        self.ov = explore.overview_cached(self.pool)
        self._cache: dict = {}
        #: server time of the last requests, seconds (for benchmarks)
        self.timings: list[tuple[str, float]] = []

    def cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def column(self, value: str | None, default: str | None = None, name: str = "column") -> str:
        cols = self.ov.columns
        if not cols:
            raise InvalidParameter(f"Index {self.ov.root!r} has no scores yet: run `cli.py score {self.ov.root}` first")
        if value is None or value == "":
            return default if default in cols else ("kl_text" if "kl_text" in cols else cols[0])
        if value not in cols:
            raise InvalidParameter(f"Unknown score column {value[:80]!r} for {name}; valid columns: {', '.join(cols)}")
        return value

    async def run(self, fn, *args):
        """``fn(*args)`` in the thread pool, holding the lock (the pool's reader is not shared)."""
        def locked():
            with self.lock:
                return fn(*args)
        return await run_in_threadpool(locked)

    def timed(self, name: str, t0: float) -> None:
        """Record the server time of a request that started at ``t0`` (the last 1,000 are kept)."""
        self.timings.append((name, time.perf_counter() - t0))
        del self.timings[:-1000]


# -- query parameters -----------------------------------------------------------------------------


def _given(q, name: str) -> str | None:
    """The raw value of parameter ``name``, or None when it is absent or empty."""
    raw = q.get(name)
    return None if raw is None or raw == "" else raw


def _parse(raw: str, name: str, convert, kind: str):
    try:
        return convert(raw)
    except ValueError:
        raise InvalidParameter(f"{name} must be {kind}, got {raw[:40]!r}") from None


def _int(q, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = _given(q, name)
    if raw is None:
        return default
    v = _parse(raw, name, int, "an integer")
    if not lo <= v <= hi:
        raise InvalidParameter(f"{name} must be in {lo}..{hi}, got {v}")
    return v


def _float(q, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    raw = _given(q, name)
    if raw is None:
        return default
    v = _parse(raw, name, float, "a number")
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        raise InvalidParameter(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {raw[:40]!r}")
    return v


def _text(q, name: str) -> str | None:
    raw = q.get(name)
    if raw is None or raw.strip() == "":
        return None
    if len(raw) > MAX_TEXT or "\x00" in raw:
        raise InvalidParameter(f"{name} is too long or holds a NUL character (at most {MAX_TEXT} characters)")
    return raw


def _one_of(q, name: str, values, default: str) -> str:
    raw = q.get(name) or default
    if raw not in values:
        raise InvalidParameter(f"{name} must be one of {', '.join(values)}, got {raw[:40]!r}")
    return raw


def _select_args(ex: Explorer, q) -> dict:
    return {"by": ex.column(q.get("by"), name="by"),
            "fraction": _float(q, "fraction", 0.25, 0.0, 1.0, lo_open=True),
            "where": _text(q, "where"), "lowest": bool(_int(q, "lowest", 0, 0, 1))}


def _vec_id(ex: Explorer, request: Request) -> int:
    raw = request.path_params["vec_id"]
    if not raw.isdigit() or len(raw) > 12 or int(raw) >= ex.pool.n:
        raise HTTPException(404)
    return int(raw)


# -- routes (the Explorer of the app is request.app.state.explorer) ---------------------------------


def _explorer(request: Request) -> Explorer:
    return request.app.state.explorer


def _html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status)


async def gallery(request: Request):
    ex, q = _explorer(request), request.query_params
    t0 = time.perf_counter()
    column = ex.column(q.get("column"))
    order = _one_of(q, "order", explore.ORDERS, "top")
    decile = _int(q, "decile", None, 1, 10)
    page = _int(q, "page", 0, 0, explore.MAX_OFFSET // explore.PAGE_SIZE)
    seed = _int(q, "seed", 0, 0, 2**62)
    if order == "decile" and decile is None:
        decile = 10

    def work():
        bounds = (ex.cached(("bounds", column), lambda: explore.decile_bounds(ex.pool, column))
                  if decile is not None and order in ("decile", "random") else None)
        p = explore.gallery(ex.pool, column, order, page, decile=decile if order in ("decile", "random") else None,
                            seed=seed, bounds=bounds)
        return pages.gallery_page(ex.ov, p, explore.PAGE_SIZE)
    out = await ex.run(work)
    ex.timed("gallery", t0)
    return _html(out)


async def plots(request: Request):
    ex, q = _explorer(request), request.query_params
    x = ex.column(q.get("x"), "kl_text", "x")
    y = ex.column(q.get("y"), "clipscore", "y")
    want_corr = bool(_int(q, "corr", 0, 0, 1)) or ex.ov.n <= CORR_INLINE_MAX or "corr" in ex._cache

    def work():
        hists = ex.cached("hists", lambda: {c: histogram_svg(explore.histogram(ex.pool, c), c)
                                            for c in ex.ov.columns})
        xs, ys = explore.scatter(ex.pool, x, y, 2000)
        corr = ex.cached("corr", lambda: explore.correlations(ex.pool)) if want_corr else None
        return pages.plots_page(ex.ov, hists, scatter_svg(xs, ys, x, y), x, y, corr)
    return _html(await ex.run(work))


def _prompt_result(ex: Explorer, prompt, embedding, a, dist=True):
    view = explore.prompt_view(ex.pool, prompt, embedding, logit_scale=a, distribution=dist)
    hist = histogram_svg(view.weight_hist, "log10(w / mean w)", 420, 180) if view.summary else ""
    return pages.prompt_page(ex.ov, prompt or view.label, view, hist, a)


async def prompt(request: Request):
    ex = _explorer(request)
    if request.method == "POST":
        return await _prompt_upload(ex, request)
    q = request.query_params
    text = _text(q, "prompt")
    a = _float(q, "logit_scale", 10.0, 0.0, 1e4, lo_open=True)
    dist = bool(_int(q, "dist", 0, 0, 1)) or ex.ov.n <= DIST_INLINE_MAX
    if text is None:
        return _html(pages.prompt_page(ex.ov, "", None, "", a))
    return _html(await ex.run(lambda: _prompt_result(ex, text, None, a, dist)))


async def _prompt_upload(ex: Explorer, request: Request):
    """POST /prompt: the prompt is an uploaded ``.npy`` embedding."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > explore.MAX_EMBEDDING_BYTES + 65536:
        raise InvalidParameter(f"The upload has {int(length):,} bytes; a prompt embedding .npy is at most "
                               f"{explore.MAX_EMBEDDING_BYTES:,}")
    async with request.form(max_files=1, max_fields=4, max_part_size=explore.MAX_EMBEDDING_BYTES) as form:
        q = {k: v for k, v in form.items() if isinstance(v, str)}
        a = _float(q, "logit_scale", 10.0, 0.0, 1e4, lo_open=True)
        upload = form.get("embedding")
        if upload is None or isinstance(upload, str):
            raise InvalidParameter("Choose a .npy file holding the prompt's embedding")
        data = await upload.read(explore.MAX_EMBEDDING_BYTES + 1)
        label = Path(upload.filename or "upload.npy").name[:80]
    vec = explore.load_uploaded_embedding(data, ex.pool.dim)
    return _html(await ex.run(lambda: _prompt_result(ex, f"embedding:{label}", vec, a)))


async def select(request: Request):
    ex, q = _explorer(request), request.query_params
    args = _select_args(ex, q)
    if "by" not in q:
        return _html(pages.select_page(ex.ov, args, None, []))

    def work():
        sel, cards = explore.selection(ex.pool, args["by"], args["fraction"], args["where"], args["lowest"])
        return pages.select_page(ex.ov, args, sel, cards)
    return _html(await ex.run(work))


async def select_npy(request: Request):
    ex = _explorer(request)
    a = _select_args(ex, request.query_params)
    data = await ex.run(lambda: explore.selection_npy(ex.pool, a["by"], a["fraction"], a["where"], a["lowest"]))
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": 'attachment; filename="subset.npy"'})


async def image(request: Request):
    ex = _explorer(request)
    v = _vec_id(ex, request)
    found = await ex.run(lambda: explore.image_file(ex.pool, v))
    if found is None:
        raise HTTPException(404)
    path, kind = found
    return FileResponse(path, media_type=kind, headers={"Cache-Control": "max-age=3600"})


async def picture(request: Request):
    ex = _explorer(request)
    v = _vec_id(ex, request)
    card = (await ex.run(lambda: explore.cards(ex.pool, [v])))[0]
    return Response(explore.caption_picture(card["caption"]), media_type="image/svg+xml")


# -- errors and headers ----------------------------------------------------------------------------

#: Errors that are the request's fault (400); any other ClipIndexError is the server's (500).
BAD_REQUEST = (InvalidParameter, BadInput, QueryError, NotReadOnly, UnknownQuery)


async def bad_input(request: Request, exc: ClipIndexError):
    status = 400 if isinstance(exc, BAD_REQUEST) else 500
    return _html(pages.error_page(str(exc), _explorer(request).ov, status), status)


async def http_error(request: Request, exc: HTTPException):
    status = exc.status_code
    msg = {404: "No such page or sample.", 405: "Method not allowed."}.get(status, exc.detail or "Error")
    return _html(pages.error_page(msg, _explorer(request).ov, status), status)


async def server_error(request: Request, exc: Exception):
    log.exception("explorer: %s %s failed", request.method, request.url.path)
    return _html(pages.error_page(f"The request failed ({type(exc).__name__}); see the server's log.",
                                  _explorer(request).ov, 500), 500)


async def security_headers(request: Request, call_next):
    response = await call_next(request)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def create_app(index_dir: str | Path, host: str = "127.0.0.1", port: int | None = None) -> Starlette:
    """The app serving ``index_dir``; ``host`` (and ``port``) for the Host-header check."""
    ex = Explorer(index_dir)
    # a wildcard bind is reached by whatever name or address the machine has: no Host check then
    hosts = ["*"] if host in ("0.0.0.0", "::", "") else sorted({host, "127.0.0.1", "localhost", "::1", "[::1]"})
    app = Starlette(
        debug=False,
        routes=[
            Route("/", gallery),
            Route("/plots", plots),
            Route("/prompt", prompt, methods=["GET", "POST"]),
            Route("/select", select),
            Route("/select.npy", select_npy),
            Route("/image/{vec_id}", image),
            Route("/picture/{vec_id}.svg", picture),
            Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts),
                    Middleware(BaseHTTPMiddleware, dispatch=security_headers)],
        exception_handlers={ClipIndexError: bad_input, HTTPException: http_error, Exception: server_error},
    )
    app.state.explorer = ex
    return app


def serve(index_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, announce=None) -> None:
    """Run the explorer with uvicorn until Ctrl-C; ``announce()`` is called once the index is open."""
    import socket

    import uvicorn

    try:  # a port in use (or an address not on this machine) is one line, before the index is opened
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(info[0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(info[4])
    except OSError as e:
        raise InvalidParameter.naming("Cannot listen on {address}: {why}; choose another {port}", address=f"{host}:{port}",
                                      why=e.strerror or e) from None
    app = create_app(index_dir, host, port)
    if announce is not None:
        announce()
    uvicorn.run(app, host=host, port=port, log_level="warning")

"""The data behind the explorer (``cli.py serve``) and the static report (``cli.py report``).

Everything here reads the catalog through the read-only, sandboxed connection that
``PoolIndex.reader()`` keeps (``indexer.store.READ_ONLY_CONFIG``), and every user value reaches SQL
the way ``cli.py query`` sends it: named queries from ``sql/*.sql`` whose column parameters are
checked against the ``scores`` allowlist and whose values are bound (``queries.sqlrun.run_named``),
or vec_ids bound one parameter each. Selections and prompts go through ``queries.selection`` and
``queries.weighting`` unchanged, so the explorer shows what ``select`` / ``weights`` / ``sample``
compute and downloads the file ``select --out X.npy`` writes.

Images: ``image_file(pool, vec_id)`` is the only way to a file. The user names a vec_id, never a
path; the path is the one the catalog records for that sample (an open_clip folder's image column,
relative to the folder the index was built from, or an absolute clip-retrieval ``image_path``), and it is
served only when it resolves (symbolic links followed) to a regular file with an image suffix and
an image's first bytes, inside that folder when the index records one.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.indexer.pool import as_pool
from clip_density_index.queries.identifiers import check_score_column, score_columns
from clip_density_index.queries.named import get_query
from clip_density_index.queries.sqlrun import run_named

#: Gallery orders.
ORDERS = ("top", "bottom", "decile", "random")
#: Cards per gallery page (the most a request may ask for).
PAGE_SIZE = 24
MAX_PAGE_SIZE = 200
#: Deepest page offset the gallery serves (rows): deeper pages are reached by a decile.
MAX_OFFSET = 100_000
#: Image suffixes served, and the first bytes each kind of file starts with.
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
               ".webp": "image/webp", ".bmp": "image/bmp"}
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"RIFF", b"BM")
#: Largest image file served (bytes).
MAX_IMAGE_BYTES = 32 * 2**20
#: Largest uploaded prompt embedding (bytes): a (1, 4096) float64 array is 32 KiB.
MAX_EMBEDDING_BYTES = 1 * 2**20
#: The KL columns the report shows the top and bottom of.
KL_COLUMNS = ("kl_text", "kl_image", "klr_text", "klr_image")


def named(index, name: str, **params: Any) -> pa.Table:
    """Run the named query ``sql/<name>.sql`` on the index's kept read-only reader (the path of
    ``queries.run_query``: allowlisted columns, bound values), without reopening the catalog."""
    pool = as_pool(index)
    query = get_query(name)
    with pool.reader().cursor() as s:
        return run_named(s, query, params)


def _rows_by_vec_id(pool, sql_name: str, vec_ids: list[int]) -> dict[int, dict]:
    """Rows of ``sql/<sql_name>.sql`` for the given vec_ids, by vec_id: ``samples`` by point
    lookups (one bound parameter per id, through its index), ``scores`` (no index) by a semi-join
    with the ids registered as an Arrow table."""
    if not vec_ids:
        return {}
    ids = [int(v) for v in vec_ids]
    with pool.reader().cursor() as s:
        if sql_name == "explore_scores_rows":
            with s.registered(_ids=pa.table({"vec_id": pa.array(ids, pa.int64())})):
                table = s.arrow(sql_name)
        else:
            table = s.arrow_in(sql_name, ids)
    return {int(r["vec_id"]): r for r in table.to_pylist()}


# -- overview -----------------------------------------------------------------------------------
@dataclass
class Overview:
    """What the pages need to know about the index once."""

    root: str
    n: int
    dim: int
    source: str
    synthetic: bool
    model: str | None
    columns: list[str]
    sample_columns: list[str]
    media: dict[str, str | None] = field(default_factory=dict)
    image_root: str | None = None
    can_encode: bool = False


def overview(index) -> Overview:
    """Index facts, score columns (the allowlist) and where images can come from."""
    pool = as_pool(index)
    with pool.reader().cursor() as s:
        cols = score_columns(s) if s.has_table("scores") else []
        # the columns a run computed (a column of NULLs is not offered)
        filled = [c for c in cols if s.rows("score_column_counts", {"column": c})[0]["filled"]]
        sample_cols = [name for name, _ in s.columns("samples")]
    m = pool.manifest
    extra = m.get("extra") or {}
    media: dict[str, str | None] = {"image": None, "url": None}
    image_root = None
    if m.get("source") == "open_clip" and extra.get("format") == "folder" and extra.get("input"):
        col = extra.get("image_column") or "image"
        if col in sample_cols:
            media["image"], image_root = col, str(extra["input"])
    if media["image"] is None and "image_path" in sample_cols:
        media["image"] = "image_path"
    if "url" in sample_cols:
        media["url"] = "url"
    can_encode = bool(pool.synthetic or (m.get("source") == "open_clip" and m.get("model") and m.get("pretrained")
                                         and m.get("pretrained") != "random"))
    return Overview(str(pool.root), pool.n, pool.dim, str(m.get("source")), pool.synthetic, m.get("model"),
                    filled, sample_cols, media, image_root, can_encode)


# -- gallery ------------------------------------------------------------------------------------
def decile_bounds(index, column: str) -> list[float]:
    """The 9 boundaries of the deciles of ``column`` (``sql/score_decile_bounds.sql``)."""
    row = named(index, "score_decile_bounds", column=column).to_pylist()[0]
    return [float(b) for b in (row["bounds"] or [])]


@dataclass
class Page:
    """One gallery page."""

    column: str
    order: str
    decile: int | None
    page: int
    seed: int | None
    cards: list[dict]
    lo: float | None = None
    hi: float | None = None


def gallery(index, column: str, order: str = "top", page: int = 0, *, decile: int | None = None,
            seed: int | None = None, per_page: int = PAGE_SIZE, bounds: list[float] | None = None) -> Page:
    """A page of cards ranked by ``column``.

    Args:
        order: "top" (highest first), "bottom" (lowest first), "decile" (decile ``decile``, 1 =
            lowest scores, highest first within it) or "random" (a seeded random page of
            ``decile``, or of the whole pool without one).
        page: page number from 0 (not for "random": a new seed is a new page).
        bounds: ``decile_bounds(index, column)`` when the caller keeps them (they cost a pass).

    Raises:
        InvalidParameter: unknown column or order, a decile outside 1-10, a page too deep.
    """
    pool = as_pool(index)
    if order not in ORDERS:
        raise InvalidParameter(f"Unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    page, per_page = int(page), int(per_page)
    if not 1 <= per_page <= MAX_PAGE_SIZE:
        raise InvalidParameter(f"per_page must be in 1..{MAX_PAGE_SIZE}, got {per_page}")
    if page < 0 or page * per_page > MAX_OFFSET:
        raise InvalidParameter(f"page must be in 0..{MAX_OFFSET // per_page} (use a decile to go deeper), got {page}")
    if order == "decile" and decile is None:
        decile = 10
    lo = hi = None
    if decile is not None:
        if not 1 <= int(decile) <= 10:
            raise InvalidParameter(f"decile must be in 1..10, got {decile}")
        decile = int(decile)
        b = bounds if bounds is not None else decile_bounds(pool, column)
        if len(b) == 9:
            lo = b[decile - 2] if decile > 1 else None
            hi = b[decile - 1] if decile < 10 else None
    if order == "random":
        seed = 0 if seed is None else int(seed)
        page = 0
    else:
        seed = None
    t = named(pool, "gallery_page", column=column, lowest=int(order == "bottom"), lo=lo, hi=hi, seed=seed,
              limit=per_page, offset=page * per_page)
    ids = t.column("vec_id").to_pylist()
    return Page(column, order, decile, page, seed, cards(pool, ids), lo, hi)


def cards(index, vec_ids: list[int]) -> list[dict]:
    """One dict per vec_id, in order: ``vec_id, uid, caption, scores`` (every score column) and
    ``image_url`` / ``url`` / ``has_image`` for the card's picture."""
    pool = as_pool(index)
    ids = [int(v) for v in vec_ids]
    samples = _rows_by_vec_id(pool, "explore_samples_rows", sorted(set(ids)))
    with pool.reader().cursor() as s:
        has_scores = s.has_table("scores")
    scores = _rows_by_vec_id(pool, "explore_scores_rows", sorted(set(ids))) if has_scores else {}
    ov = overview_cached(pool)
    out = []
    for v in ids:
        s = samples.get(v, {})
        sc = {k: x for k, x in scores.get(v, {}).items() if k in ov.columns}
        url = s.get(ov.media["url"]) if ov.media["url"] else None
        url = url if isinstance(url, str) and url.lower().startswith(("http://", "https://")) else None
        path = s.get(ov.media["image"]) if ov.media["image"] else None
        out.append({"vec_id": v, "uid": s.get("uid"), "caption": s.get("caption") or "", "scores": sc,
                    "has_image": bool(path), "url": url})
    return out


_OVERVIEWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def overview_cached(pool) -> Overview:
    """``overview(pool)``, computed once per ``PoolIndex`` object (and forgotten with it)."""
    ov = _OVERVIEWS.get(pool)
    if ov is None:
        ov = _OVERVIEWS[pool] = overview(pool)
    return ov


# -- images -------------------------------------------------------------------------------------
def image_file(index, vec_id: int) -> tuple[Path, str] | None:
    """The image file the catalog records for ``vec_id`` and its media type, or None.

    None unless the recorded path resolves to a regular file with an image suffix and an image's
    first bytes, no larger than ``MAX_IMAGE_BYTES``, inside the folder the index was built from
    when it records one (an open_clip folder source)."""
    pool = as_pool(index)
    ov = overview_cached(pool)
    if ov.media["image"] is None:
        return None
    v = int(vec_id)
    if not 0 <= v < pool.n:
        return None
    row = _rows_by_vec_id(pool, "explore_samples_rows", [v]).get(v) or {}
    rel = row.get(ov.media["image"])
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return None
    if ov.image_root is None and not os.path.isabs(rel):
        return None  # relative to what? not to the server's working directory
    path = Path(ov.image_root) / rel if ov.image_root else Path(rel)
    try:
        real = Path(os.path.realpath(path))
        if ov.image_root is not None:
            root = Path(os.path.realpath(ov.image_root))
            if root != real and root not in real.parents:
                return None
        kind = IMAGE_TYPES.get(real.suffix.lower())
        if kind is None or not real.is_file() or real.stat().st_size > MAX_IMAGE_BYTES:
            return None
        with open(real, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    if not head.startswith(_MAGIC) or (head.startswith(b"RIFF") and head[8:12] != b"WEBP"):
        return None
    return real, kind


_PALETTE = ("#e45756", "#4c78a8", "#f58518", "#54a24b", "#b279a2", "#eeca3b", "#72b7b2", "#ff9da6",
            "#9d755d", "#bab0ac")


def caption_picture(caption: str, size: int = 160) -> str:
    """A generated SVG picture for a sample without an image (the synthetic world): one shape per
    word of the caption (shape, colour and place from a hash of the word), so equal concepts look
    alike across cards. Pure function of the caption; the text is not embedded."""
    words = [w.strip(".,;:!?'\"").lower() for w in caption.split()]
    words = [w for w in words if len(w) > 3][:6] or ["blank"]
    bg = _PALETTE[int(hashlib.md5(caption.encode("utf-8", "replace")).hexdigest()[:2], 16) % len(_PALETTE)]
    parts = [f'<rect width="{size}" height="{size}" fill="{bg}" opacity="0.18"/>']
    for i, w in enumerate(words):
        h = hashlib.md5(w.encode("utf-8", "replace")).digest()
        color = _PALETTE[h[0] % len(_PALETTE)]
        x, y = 20 + h[1] % (size - 40), 20 + h[2] % (size - 40)
        r = 12 + h[3] % 22
        kind = h[4] % 3
        if kind == 0:
            parts.append(f'<circle cx="{x}" cy="{y}" r="{r}" fill="{color}" opacity="0.85"/>')
        elif kind == 1:
            parts.append(f'<rect x="{x - r}" y="{y - r}" width="{2 * r}" height="{2 * r}" rx="4" '
                         f'fill="{color}" opacity="0.85"/>')
        else:
            parts.append(f'<polygon points="{x},{y - r} {x + r},{y + r} {x - r},{y + r}" fill="{color}" '
                         'opacity="0.85"/>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {size} {size}" role="img" '
            f'aria-label="generated picture">' + "".join(parts) + "</svg>")


# -- plots --------------------------------------------------------------------------------------
def histogram(index, column: str, bins: int = 40) -> list[dict]:
    """Bins of ``column``: ``bin, n, lo, hi`` (``sql/score_histogram.sql``)."""
    return named(index, "score_histogram", column=column, bins=bins).to_pylist()


def scatter(index, x: str, y: str, points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """``points`` (x, y) pairs of two score columns, spread over the pool (``sql/score_scatter.sql``)."""
    t = named(index, "score_scatter", x=x, y=y, points=points)
    return (t.column("x").to_numpy(zero_copy_only=False).astype(float),
            t.column("y").to_numpy(zero_copy_only=False).astype(float))


def correlations(index) -> list[dict]:
    """The paper's correlation table (``sql/score_correlations.sql``), or [] when the index has no
    scores."""
    pool = as_pool(index)
    with pool.reader().cursor() as s:
        if not s.has_table("scores"):
            return []
    return named(pool, "score_correlations").to_pylist()


def check_column(index, column: str) -> str:
    """``column`` if it is a filled score column of the index, else ``InvalidParameter``."""
    pool = as_pool(index)
    with pool.reader().cursor() as s:
        check_score_column(s, column)
    return column


# -- prompts and selections ---------------------------------------------------------------------
def load_uploaded_embedding(data: bytes, dim: int) -> np.ndarray:
    """A prompt embedding from the bytes of an uploaded ``.npy`` (no pickles), checked by
    ``queries.prompts.load_prompt_embedding``.

    Raises:
        BadInput / InvalidParameter: too large, not a .npy array, wrong shape or dimension.
    """
    from clip_density_index.indexer.errors import BadInput
    from clip_density_index.queries.prompts import load_prompt_embedding

    if len(data) > MAX_EMBEDDING_BYTES:
        raise InvalidParameter(f"The uploaded embedding has {len(data):,} bytes; at most {MAX_EMBEDDING_BYTES:,}")
    if not data:
        raise InvalidParameter("The uploaded embedding file is empty")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, OSError, EOFError, UnpicklingError ...
        raise BadInput(f"The uploaded file is not a readable .npy array ({type(e).__name__})") from None
    if not isinstance(arr, np.ndarray):
        raise BadInput("The uploaded file is a .npz archive; give a .npy file holding the one embedding")
    return load_prompt_embedding(arr, dim)


@dataclass
class PromptView:
    """What the prompt box shows."""

    label: str
    encoder: str
    summary: dict | None
    top: list[dict]
    weight_hist: list[dict]


def prompt_view(index, prompt: str | None = None, embedding: np.ndarray | None = None, n: int = 24,
                logit_scale: float = 10.0, distribution: bool = True) -> PromptView:
    """The top ``n`` samples by weight (``queries.weighting.sample(mode="top")``, as
    ``cli.py sample --mode top``) and, with ``distribution``, the weights' summary and histogram of
    ``log10`` normalised weights (``queries.weighting.compute_weights``, as ``cli.py weights``: one
    pass over every image; nothing is stored). Without it, ``summary`` is None and the top samples
    cost what ``sample --mode top`` costs."""
    from clip_density_index.queries.prompts import encode_prompt
    from clip_density_index.queries.weighting import compute_weights, sample

    pool = as_pool(index)
    p = encode_prompt(pool, prompt, embedding)  # once: the synthetic world's encoder takes ~1 s to build
    top = sample(pool, p.label, p.vector, n=min(int(n), pool.n), mode="top", logit_scale=logit_scale)
    ids = top.column("vec_id").to_pylist()
    cs = cards(pool, ids)
    for c, cos, wt in zip(cs, top.column("cosine").to_pylist(), top.column("weight").to_pylist()):
        c["cosine"], c["weight"] = cos, wt
    if not distribution:
        return PromptView(p.label, p.encoder, None, cs, [])
    w = compute_weights(pool, p.label, p.vector, logit_scale)
    for c in cs:
        c["normalized_weight"] = math.exp(c["cosine"] * w.logit_scale - w.log_mean)
    lw = (w.log_weight - w.log_mean) / math.log(10)  # log10(w / mean w), without another exp pass
    counts, edges = np.histogram(lw, bins=40)
    hist = [{"bin": i, "n": int(c), "lo": float(edges[i]), "hi": float(edges[i + 1])} for i, c in enumerate(counts)]
    return PromptView(p.label, p.encoder, w.summary(), cs, hist)


def selection(index, by: str, fraction: float, where: str | None = None, lowest: bool = False,
              examples: int = 12):
    """``queries.selection.select`` (no file) and cards of the first ``examples`` kept samples."""
    from clip_density_index.queries.selection import select

    pool = as_pool(index)
    sel = select(pool, by, fraction, where=where, lowest=lowest)
    ids = sel.table.column("vec_id").to_pylist()[:examples]
    return sel, cards(pool, ids)


def selection_npy(index, by: str, fraction: float, where: str | None = None, lowest: bool = False) -> bytes:
    """The bytes of the DataComp subset ``.npy`` that ``select --out X.npy`` writes for the same
    arguments (``queries.selection.datacomp_subset`` saved by ``np.save``)."""
    from clip_density_index.queries.selection import datacomp_subset, select

    sel = select(as_pool(index), by, fraction, where=where, lowest=lowest)
    buf = io.BytesIO()
    np.save(buf, datacomp_subset(sel.uids))
    return buf.getvalue()

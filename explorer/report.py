"""``cli.py report INDEX --out report.html``: one self-contained HTML file (inline stylesheet,
inline SVG plots, thumbnails as data: URIs or generated pictures; no external requests: its
Content-Security-Policy forbids them) with the overview, histograms, correlations and the top and
bottom samples of each KL column."""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path

from clip_density_index.explorer import pages
from clip_density_index.explorer.app import STATIC
from clip_density_index.explorer.svg import histogram_svg
from clip_density_index.indexer.pool import as_pool
from clip_density_index.queries import explore
from clip_density_index.queries.outfile import atomic_write, check_out

#: Samples shown at each end of each KL column.
PER_END = 8
THUMB = 128
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _thumbs(pool, cards: list[dict]) -> dict[int, str]:
    """vec_id -> a small JPEG data: URI, for cards whose image the index serves."""
    from PIL import Image, ImageOps

    out = {}
    for c in cards:
        if not c.get("has_image"):
            continue
        found = explore.image_file(pool, c["vec_id"])
        if found is None:
            continue
        try:
            with Image.open(found[0]) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                im.thumbnail((THUMB, THUMB))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=80)
        except Exception:  # an unreadable image: the generated picture instead
            continue
        out[c["vec_id"]] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return out


def report_html(index) -> str:
    """The report's HTML text."""
    pool = as_pool(index)
    ov = explore.overview(pool)
    facts = {"index": ov.root, "samples": f"{ov.n:,}", "dimension": ov.dim, "source": ov.source,
             "model": ov.model or "-", "synthetic": "yes (SYNTHETIC data)" if ov.synthetic else "no",
             "logit scale a": pool.logit_scale, "score columns": ", ".join(ov.columns) or "none (run score)"}
    body = ["<h1>Overview</h1><table class=facts id=overview>"
            + "".join(f"<tr><td>{escape(k)}</td><td>{escape(pages.fmt(v))}</td></tr>" for k, v in facts.items())
            + "</table>"]
    if ov.columns:
        hists = "".join(f'<div class="hist">{histogram_svg(explore.histogram(pool, c), c)}</div>' for c in ov.columns)
        body.append(f"<h1>Histograms</h1><div class=hists id=histograms>{hists}</div>")
        body.append(f"<h1>Correlations (SPEC 10)</h1>{pages.corr_table(explore.correlations(pool))}")
        for col in [c for c in explore.KL_COLUMNS if c in ov.columns]:
            for order, what in (("top", "highest"), ("bottom", "lowest")):
                page = explore.gallery(pool, col, order, 0, per_page=PER_END)
                thumbs = _thumbs(pool, page.cards)
                cards = "".join(pages.card_html(c, col, embed=thumbs, rank=i + 1) for i, c in enumerate(page.cards))
                body.append(f'<h2>{escape(col)}: the {what} {PER_END}</h2><div class="grid" '
                            f'id="{escape(col)}-{order}">{cards}</div>')
    css = (STATIC / "style.css").read_text(encoding="utf-8")
    html = pages.layout("Report", "".join(body), ov, css_href=None, inline_css=css)
    return html.replace("<head>", f'<head><meta http-equiv="Content-Security-Policy" content="{REPORT_CSP}">', 1)


def write_report(index, out: str | Path, force: bool = False) -> Path:
    """Write the report to ``out`` (atomically; an existing file only with ``force``)."""
    path = check_out(out, force)
    data = report_html(index).encode("utf-8")
    atomic_write(path, lambda p: p.write_bytes(data), size=len(data))
    return path

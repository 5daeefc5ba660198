"""HTML of the explorer's pages and of the static report: plain server-rendered HTML, every value
escaped (``html.escape``), no templates, no JavaScript."""

from __future__ import annotations

import math
from html import escape
from urllib.parse import urlencode

from clip_density_index.queries.explore import ORDERS, caption_picture

NAV = (("/", "Gallery"), ("/plots", "Plots"), ("/prompt", "Prompt"), ("/select", "Selection"))


def fmt(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        a = abs(v)
        return f"{v:.3e}" if a != 0 and (a >= 1e5 or a < 1e-3) else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def layout(title: str, body: str, ov, active: str = "/", css_href: str | None = "/static/style.css",
           inline_css: str | None = None) -> str:
    nav = "".join(f'<a href="{h}"{" class=active" if h == active else ""}>{t}</a>' for h, t in NAV) if css_href else ""
    synth = ('<span class="badge" title="the built-in synthetic CLIP-like world">SYNTHETIC data</span>'
             if ov is not None and ov.synthetic else "")
    head = (f'<link rel="stylesheet" href="{css_href}">' if css_href else f"<style>{inline_css or ''}</style>")
    where = (f'<span class="index">{escape(ov.root)} &middot; {ov.n:,} samples &middot; {escape(ov.source)}</span>'
             if ov is not None else "")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">{head}</head><body>'
            f'<header><strong>clip-density-index</strong> {synth} {where}<nav>{nav}</nav></header>'
            f'<main id="view-{escape(title.lower().split()[0])}">{body}</main></body></html>')


def error_page(message: str, ov=None, status: int = 400) -> str:
    what = "Bad request" if status == 400 else ("Not found" if status == 404 else "Error")
    return layout(what, f'<h1>{what}</h1><p class="error" id="error">{escape(message)}</p>'
                        '<p><a href="/">Back to the gallery</a></p>', ov)


def options(values, selected) -> str:
    return "".join(f'<option value="{escape(str(v))}"{" selected" if str(v) == str(selected) else ""}>'
                   f'{escape(str(label))}</option>' for v, label in values)


def picture(card: dict, embed: dict | None = None) -> str:
    """The card's picture: the index's image (``/image/VEC_ID``), its URL (loaded lazily by the
    browser), or a generated picture from the caption. ``embed``: vec_id -> data: URI (report)."""
    if embed is not None:
        uri = embed.get(card["vec_id"])
        if uri:
            return f'<img class="thumb" src="{uri}" alt="image {card["vec_id"]}">'
        return f'<div class="thumb gen">{caption_picture(card["caption"])}</div>'
    if card.get("has_image"):
        return f'<img class="thumb" loading="lazy" src="/image/{int(card["vec_id"])}" alt="image {card["vec_id"]}">'
    if card.get("url"):
        return (f'<img class="thumb" loading="lazy" referrerpolicy="no-referrer" src="{escape(card["url"])}" '
                f'alt="image {card["vec_id"]}">')
    return f'<div class="thumb gen">{caption_picture(card["caption"])}</div>'


def card_html(card: dict, column: str | None = None, extra: dict | None = None, embed: dict | None = None,
              rank: int | None = None) -> str:
    scores = card.get("scores") or {}
    main = ""
    if column and column in scores:
        main = f'<div class="score"><b>{escape(column)}</b> {escape(fmt(scores[column]))}</div>'
    more = "".join(f"<div><b>{escape(k)}</b> {escape(fmt(v))}</div>" for k, v in (extra or {}).items())
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(fmt(v))}</td></tr>" for k, v in scores.items())
    details = f"<details><summary>all scores</summary><table>{rows}</table></details>" if rows else ""
    r = f'<span class="rank">#{rank}</span> ' if rank is not None else ""
    return (f'<div class="card" data-vec-id="{int(card["vec_id"])}" data-uid="{escape(str(card.get("uid")))}">'
            f'{picture(card, embed)}<div class="caption">{r}{escape(card["caption"])}</div>'
            f'<div class="uid">{escape(str(card.get("uid")))}</div>{main}{more}{details}</div>')


def gallery_page(ov, page, per_page: int) -> str:
    cols = [(c, c) for c in ov.columns]
    dec = [(d, f"decile {d}" + (" (lowest)" if d == 1 else " (highest)" if d == 10 else "")) for d in range(1, 11)]
    form = (f'<form method="get" action="/" id="gallery-form">'
            f'<label>score <select name="column" id="column">{options(cols, page.column)}</select></label> '
            f'<label>order <select name="order" id="order">{options([(o, o) for o in ORDERS], page.order)}</select></label> '
            f'<label>decile <select name="decile" id="decile">{options(dec, page.decile or 10)}</select></label> '
            f'<button type="submit" id="show">Show</button></form>')
    base = {"column": page.column, "order": page.order}
    if page.decile is not None and page.order in ("decile", "random"):
        base["decile"] = page.decile
    links = []
    if page.order == "random":
        links.append(f'<a id="next" href="/?{urlencode({**base, "seed": (page.seed or 0) + 1})}">another random page</a>')
    else:
        if page.page > 0:
            links.append(f'<a id="prev" href="/?{urlencode({**base, "page": page.page - 1})}">&larr; previous</a>')
        if len(page.cards) == per_page:
            links.append(f'<a id="next" href="/?{urlencode({**base, "page": page.page + 1})}">next &rarr;</a>')
    what = {"top": "highest first", "bottom": "lowest first", "decile": f"decile {page.decile}, highest first",
            "random": f"random page of decile {page.decile} (seed {page.seed})" if page.decile
            else f"random page (seed {page.seed})"}[page.order]
    rng = ""
    if page.lo is not None or page.hi is not None:
        rng = f" &middot; {escape(fmt(page.lo) if page.lo is not None else '-inf')} &le; {escape(page.column)} &lt; " \
              f"{escape(fmt(page.hi) if page.hi is not None else 'inf')}"
    status = f'<p class="status" id="status">{escape(page.column)}: {escape(what)}, page {page.page + 1}{rng}</p>'
    start = page.page * per_page + 1 if page.order != "random" else None
    cards = "".join(card_html(c, page.column, rank=(start + i if start else None)) for i, c in enumerate(page.cards))
    empty = "" if page.cards else '<p id="empty">No samples here.</p>'
    return layout("Gallery", f"<h1>Gallery</h1>{form}{status}<div class=grid id=cards>{cards}</div>{empty}"
                             f'<p class="paging">{" ".join(links)}</p>', ov, "/")


def corr_table(rows: list[dict] | None, ask: str = "") -> str:
    if rows is None:
        return (f'<p id="correlations-ask"><a href="{escape(ask)}" id="compute-correlations">Compute the correlation '
                'table</a> (it ranks every score column of the pool: a minute or more on large pools; kept for the '
                'session once computed).</p>')
    if not rows:
        return "<p>No scores yet.</p>"
    head = "<tr><th>side</th><th>measure</th><th>method</th><th>D_KL</th><th>D_KLR</th><th>D_C</th><th>D_W</th><th>n</th></tr>"
    body = "".join(
        f"<tr><td>{escape(str(r['side']))}</td><td>{escape(str(r['measure']))}</td><td>{escape(str(r['method']))}</td>"
        + "".join(f"<td>{'' if r[k] is None else f'{r[k]:+.3f}'}</td>" for k in ("kl", "klr", "dc", "dw"))
        + f"<td>{fmt(r['n'])}</td></tr>" for r in rows)
    return f'<table class="corr" id="correlations">{head}{body}</table>'


def plots_page(ov, hists: dict[str, str], scatter: str, x: str, y: str, corr: list[dict]) -> str:
    cols = [(c, c) for c in ov.columns]
    form = (f'<form method="get" action="/plots" id="scatter-form"><label>x <select name="x" id="x">{options(cols, x)}'
            f'</select></label> <label>y <select name="y" id="y">{options(cols, y)}</select></label> '
            f'<button type="submit" id="draw">Draw</button></form>')
    grid = "".join(f'<div class="hist" data-column="{escape(c)}">{s}</div>' for c, s in hists.items())
    return layout("Plots", f"<h1>Scatter</h1>{form}<div id=scatter>{scatter}</div>"
                           f"<h1>Correlations (SPEC 10)</h1>{corr_table(corr, '/plots?' + urlencode({'x': x, 'y': y, 'corr': 1}))}"
                           f"<h1>Histograms</h1><div class=hists id=histograms>{grid}</div>", ov, "/plots")


def prompt_page(ov, prompt: str, view, hist_svg: str, logit_scale: float) -> str:
    form = (f'<form method="get" action="/prompt" id="prompt-form"><label>prompt <input name="prompt" id="prompt" '
            f'size="40" value="{escape(prompt)}"></label> <label>a\' <input name="logit_scale" id="logit_scale" '
            f'size="5" value="{escape(fmt(logit_scale))}"></label> <button type="submit" id="run">Weigh</button></form>'
            f'<form method="post" action="/prompt" enctype="multipart/form-data" id="upload-form">'
            f'<label>or a prompt embedding (.npy, dimension {ov.dim}) <input type="file" name="embedding" id="embedding" '
            f'accept=".npy"></label> <input type="hidden" name="logit_scale" value="{escape(fmt(logit_scale))}">'
            f'<button type="submit" id="upload">Upload</button></form>')
    note = "" if ov.can_encode else ('<p class="note">This index has no model to encode text: upload the prompt\'s '
                                     'text embedding from the same model.</p>')
    body = f"<h1>Prompt</h1>{form}{note}"
    if view is not None and view.summary is None:
        q = urlencode({"prompt": prompt, "logit_scale": fmt(logit_scale), "dist": 1})
        body += (f'<p id="weights-ask">Prompt <b>{escape(view.label)}</b> ({escape(view.encoder)}). '
                 f'<a id="compute-weights" href="/prompt?{escape(q)}">Weight distribution over all {ov.n:,} '
                 'images</a> (one pass over every image, as <code>weights</code>).</p>'
                 "<h2>Top samples by weight</h2><div class=grid id=cards>"
                 + "".join(card_html(c, None, {"cosine": c["cosine"], "weight": c["weight"]}, rank=i + 1)
                           for i, c in enumerate(view.top)) + "</div>")
    elif view is not None:
        s = view.summary
        body += (f'<div id="weights-summary"><p>Prompt <b>{escape(view.label)}</b> ({escape(view.encoder)}), '
                 f'a\' = {fmt(s["logit_scale"])}, {s["n"]:,} images: ESS <b id="ess">{s["ess"]:,.1f}</b> '
                 f'({s["ess_fraction"]:.2%} of n); normalised weight min {fmt(s["min"])}, median {fmt(s["median"])}, '
                 f'max {fmt(s["max"])}; the top 1% hold {s["top1_share"]:.1%} of the weight.</p>{hist_svg}</div>'
                 "<h2>Top samples by weight</h2><div class=grid id=cards>"
                 + "".join(card_html(c, None, {"cosine": c["cosine"], "weight": c["weight"],
                                               "w / mean w": c["normalized_weight"]}, rank=i + 1)
                           for i, c in enumerate(view.top)) + "</div>")
    return layout("Prompt", body, ov, "/prompt")


def select_page(ov, args: dict, sel, examples: list[dict]) -> str:
    cols = [(c, c) for c in ov.columns]
    form = (f'<form method="get" action="/select" id="select-form">'
            f'<label>score <select name="by" id="by">{options(cols, args["by"])}</select></label> '
            f'<label>fraction <input name="fraction" id="fraction" size="6" value="{escape(str(args["fraction"]))}"></label> '
            f'<label>where <input name="where" id="where" size="40" value="{escape(args["where"] or "")}" '
            f'placeholder="clipscore &gt; 0.7"></label> '
            f'<label><input type="checkbox" name="lowest" value="1" id="lowest"{" checked" if args["lowest"] else ""}> lowest</label> '
            f'<button type="submit" id="preview">Preview</button></form>')
    body = f"<h1>Selection</h1>{form}"
    if sel is not None:
        q = {"by": args["by"], "fraction": args["fraction"]}
        if args["where"]:
            q["where"] = args["where"]
        if args["lowest"]:
            q["lowest"] = 1
        side = "lowest" if sel.lowest else "highest"
        thr = f"; {escape(sel.by)} {'&le;' if sel.lowest else '&ge;'} {fmt(sel.threshold)}" if sel.threshold is not None else ""
        body += (f'<p id="counts">{sel.passed_where:,} of {sel.total:,} samples passed the filter; '
                 f'{sel.candidates:,} have a value; kept <b id="kept">{sel.kept:,}</b> ({side} {escape(sel.by)}, '
                 f'fraction {sel.fraction:g}{thr})</p>'
                 f'<p><a id="download" href="/select.npy?{escape(urlencode(q))}" download="subset.npy">Download the '
                 f'DataComp subset .npy</a> (the file <code>select --out subset.npy</code> writes)</p>'
                 "<h2>Examples kept</h2><div class=grid id=cards>"
                 + "".join(card_html(c, sel.by, rank=i + 1) for i, c in enumerate(examples)) + "</div>")
    return layout("Selection", body, ov, "/select")

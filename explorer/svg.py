"""Inline SVG plots drawn on the server: histograms and scatter plots (no JavaScript, no fonts or
files to fetch). Every text that reaches the SVG is escaped."""

from __future__ import annotations

import math
from html import escape

import numpy as np

_AXIS = "#555"
_BAR = "#4c78a8"


def _fmt(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    a = abs(v)
    if a != 0 and (a >= 1e5 or a < 1e-3):
        return f"{v:.2e}"
    return f"{v:.4g}"


def histogram_svg(bins: list[dict], title: str, width: int = 320, height: int = 180, xlabel: str = "") -> str:
    """Bars of ``bins`` (dicts with ``bin``, ``n``, ``lo``, ``hi``; missing bins are empty)."""
    pad_l, pad_r, pad_t, pad_b = 40, 10, 22, 34
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot histogram" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)} histogram">',
             f'<text x="{width / 2:.0f}" y="15" text-anchor="middle" font-size="12" font-weight="bold">'
             f'{escape(title)}</text>']
    if bins:
        nb = max(int(b["bin"]) for b in bins) + 1
        counts = np.zeros(nb)
        for b in bins:
            counts[int(b["bin"])] = b["n"]
        top = counts.max() or 1
        lo, hi = float(bins[0]["lo"]), float(bins[-1]["hi"])
        bw = w / nb
        for i, c in enumerate(counts):
            if c:
                bh = h * c / top
                parts.append(f'<rect x="{pad_l + i * bw:.1f}" y="{pad_t + h - bh:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                             f'height="{bh:.1f}" fill="{_BAR}"><title>{int(c):,}</title></rect>')
        parts.append(f'<text x="{pad_l}" y="{height - 18}" font-size="10">{escape(_fmt(lo))}</text>')
        parts.append(f'<text x="{pad_l + w}" y="{height - 18}" font-size="10" text-anchor="end">'
                     f'{escape(_fmt(hi))}</text>')
        parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 8}" font-size="10" text-anchor="end">{int(top):,}</text>')
    else:
        parts.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" font-size="11">no values</text>')
    parts.append(f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="{_AXIS}"/>')
    if xlabel:
        parts.append(f'<text x="{pad_l + w / 2:.0f}" y="{height - 4}" font-size="10" text-anchor="middle">'
                     f'{escape(xlabel)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def scatter_svg(x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str, width: int = 520, height: int = 400) -> str:
    """A scatter of the points (x, y) with the axis ranges written at the corners."""
    pad_l, pad_r, pad_t, pad_b = 56, 12, 14, 40
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot scatter" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="scatter of {escape(ylabel)} against '
             f'{escape(xlabel)}">']
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x):
        x0, x1, y0, y1 = x.min(), x.max(), y.min(), y.max()
        sx = w / ((x1 - x0) or 1.0)
        sy = h / ((y1 - y0) or 1.0)
        px = pad_l + (x - x0) * sx
        py = pad_t + h - (y - y0) * sy
        parts.append(f'<g fill="{_BAR}" fill-opacity="0.45">')
        parts.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="1.8"/>' for a, b in zip(px, py))
        parts.append("</g>")
        parts.append(f'<text x="{pad_l}" y="{height - 24}" font-size="10">{escape(_fmt(x0))}</text>')
        parts.append(f'<text x="{pad_l + w}" y="{height - 24}" font-size="10" text-anchor="end">{escape(_fmt(x1))}</text>')
        parts.append(f'<text x="{pad_l - 4}" y="{pad_t + h}" font-size="10" text-anchor="end">{escape(_fmt(y0))}</text>')
        parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 10}" font-size="10" text-anchor="end">{escape(_fmt(y1))}</text>')
    else:
        parts.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" font-size="11">no points</text>')
    parts.append(f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" fill="none" stroke="{_AXIS}"/>')
    parts.append(f'<text x="{pad_l + w / 2:.0f}" y="{height - 6}" font-size="11" text-anchor="middle">{escape(xlabel)}</text>')
    parts.append(f'<text x="12" y="{pad_t + h / 2:.0f}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 12 {pad_t + h / 2:.0f})">{escape(ylabel)}</text>')
    parts.append("</svg>")
    return "".join(parts)

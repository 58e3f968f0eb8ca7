"""Page model (groups of cards, each a before/after viewer over labelled panels) and its HTML rendering.

Every image is referenced by a path relative to the page, so a report opens from file:// and keeps working
when the run folder is moved or copied as a whole.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from pid.report.previews import ImageRef
from pid.report.static import CSS, JS


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def plural(count: int, noun: str, plural_noun: str | None = None) -> str:
    """ "1 prompt", "2 prompts", "0 prompts"."""
    return f"{count} {noun if count == 1 else plural_noun or noun + 's'}"


def url_for(target: Path, page_dir: Path) -> str:
    """Relative URL of `target` from the folder of the page (percent-encoded: spaces, '#', '?' in names)."""
    try:
        relative = os.path.relpath(target.resolve(), page_dir.resolve())
    except ValueError:  # another drive (Windows): an absolute file URL still works from file://
        return target.resolve().as_uri()
    return quote(Path(relative).as_posix(), safe="/._-~")


@dataclass
class Panel:
    label: str
    ref: ImageRef | None
    source: Path | None = None  # the file the run recorded for it (None: the run has no such image)


@dataclass
class Card:
    anchor: str
    key: str  # identity of the item (tests match it against metadata.jsonl / metrics.csv)
    title: str
    tag: str  # the filter value: step label or sigma
    text: str  # what the text filter searches
    panels: list[Panel]
    a: int  # panels shown left and right of the slider
    b: int
    facts: list[tuple[str, str]] = field(default_factory=list)
    links: list[tuple[str, Path | None]] = field(default_factory=list)
    extra_html: str = ""


@dataclass
class Group:
    anchor: str
    heading: str
    facts: str
    cards: list[Card]


@dataclass
class Page:
    title: str
    status: str
    in_progress: bool
    facts: list[tuple[str, str]]
    tag_name: str  # "step" or "sigma"
    tags: list[str]
    blocks: list[str]  # HTML sections above the items (plots, tables, failures)
    groups: list[Group]
    footer: str


def render(page: Page, page_dir: Path) -> str:
    tag_boxes = "".join(
        f'<label><input type="checkbox" class="f-tag" value="{esc(t)}" checked> {esc(t)}</label>' for t in page.tags
    )
    facts = render_facts(page.facts)
    groups = "\n".join(_render_group(g, page_dir) for g in page.groups)
    if not page.groups:
        groups = '<p class="missing">No finished items yet.</p>'
    blocks = "\n".join(page.blocks)
    status_class = "status progress" if page.in_progress else "status"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="pid.report">
<title>{esc(page.title)}</title>
<style>{CSS}</style>
</head>
<body>
<header class="top">
<h1>{esc(page.title)}</h1>
<p class="{status_class}">{esc(page.status)}</p>
{facts}
</header>
<nav class="toolbar" aria-label="Filters">
<input type="search" id="q" placeholder="filter by text (prompt, image, ...)" aria-label="filter by text">
<fieldset><legend>{esc(page.tag_name)}</legend>{tag_boxes}</fieldset>
<label><input type="checkbox" id="mag" checked> magnifier 1:1</label>
<label>size <select id="size"><option value="380px">small</option><option value="560px" selected>medium</option><option value="860px">large</option><option value="100%">full width</option></select></label>
<span id="count" aria-live="polite"></span>
</nav>
<main>
{blocks}
<section id="items" aria-label="items">
{groups}
</section>
</main>
<footer>{page.footer}</footer>
<div id="loupe" hidden>
<figure class="pane" data-side="a"><div class="win"><img alt="magnified left image"></div><figcaption></figcaption></figure>
<figure class="pane" data-side="b"><div class="win"><img alt="magnified right image"></div><figcaption></figcaption></figure>
</div>
<script>{JS}</script>
</body>
</html>
"""


def render_facts(facts: Sequence[tuple[str, str]]) -> str:
    if not facts:
        return ""
    body = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    return f'<dl class="facts">{body}</dl>'


def _render_group(group: Group, page_dir: Path) -> str:
    cards = "\n".join(_render_card(c, page_dir) for c in group.cards)
    facts = f'<p class="groupfacts">{esc(group.facts)}</p>' if group.facts else ""
    single = " single" if len(group.cards) == 1 else ""  # one-card groups flow side by side
    return (f'<section class="group{single}" id="{esc(group.anchor)}">\n<h2>{esc(group.heading)}</h2>\n{facts}\n'
            f'<div class="cards">\n{cards}\n</div>\n</section>')


def _render_card(card: Card, page_dir: Path) -> str:
    available = [i for i, p in enumerate(card.panels) if p.ref is not None]
    data = [
        {"label": p.label, "src": url_for(p.ref.preview, page_dir), "full": url_for(p.ref.full, page_dir),
         "w": p.ref.width, "h": p.ref.height} if p.ref else {"label": p.label}
        for p in card.panels
    ]
    head = (f'<article class="card" id="{esc(card.anchor)}" data-key="{esc(card.key)}" data-tag="{esc(card.tag)}" '
            f'data-text="{esc(card.text.lower())}"')
    title = f"<h3>{esc(card.title)}</h3>"
    # Only files that exist are linked: a rebuilt report never points at an image deleted since the run.
    existing = [(label, path) for label, path in card.links if path is not None and path.is_file()]
    links = " ".join(f'<a href="{esc(url_for(path, page_dir))}">{esc(label)}</a>' for label, path in existing)
    links_html = f'<p class="links">{links}</p>' if links else ""
    # A recorded file that is gone (or unreadable); a panel of a run without this item is not a missing file.
    gone = [p for p in card.panels if p.ref is None and p.source is not None]
    missing = [p.label for p in gone]
    missing += [label for label, path in card.links
                if path is not None and not path.is_file() and path not in {p.source for p in gone}]
    missing_html = (f'<p class="missing">missing file: {esc(", ".join(missing))}</p>' if missing else "")
    tail = f"{render_facts(card.facts)}{card.extra_html}{links_html}{missing_html}</article>"
    if not available:
        return f'{head} data-panels="[]">{title}<p class="missing">no image files found</p>{tail}'
    a = card.a if card.a in available else available[0]
    b = card.b if card.b in available else available[-1]
    width = max(card.panels[i].ref.width for i in available)  # type: ignore[union-attr]
    height = max(card.panels[i].ref.height for i in available)  # type: ignore[union-attr]
    pa, pb = card.panels[a], card.panels[b]

    def img(cls: str, panel: Panel) -> str:
        assert panel.ref is not None
        return (f'<img class="{cls}" src="{esc(url_for(panel.ref.preview, page_dir))}" alt="{esc(panel.label)}" '
                f'width="{width}" height="{height}" loading="lazy" decoding="async" draggable="false">')

    def options(selected: int) -> str:
        return "".join(
            f'<option value="{i}"{" selected" if i == selected else ""}{"" if p.ref else " disabled"}>'
            f'{esc(p.label)}</option>' for i, p in enumerate(card.panels)
        )

    ratio = width / height
    viewer = (
        f'<div class="viewer" style="aspect-ratio:{width} / {height}; width:min(100%, calc(78vh * {ratio:.5f}))">'
        f'{img("va", pa)}{img("vb", pb)}<span class="tag ta">{esc(pa.label)}</span>'
        f'<span class="tag tb">{esc(pb.label)}</span><div class="handle"></div><div class="lens" hidden></div></div>'
    )
    controls = (
        f'<div class="controls"><label>left <select class="pick" data-side="a">{options(a)}</select></label>'
        f'<input type="range" class="pos" min="0" max="1000" value="500" aria-label="slider position">'
        f'<label>right <select class="pick" data-side="b">{options(b)}</select></label></div>'
    )
    strip = ""
    if len(card.panels) > 2:
        thumbs = "".join(
            f'<li><button type="button" class="thumb" data-i="{i}" title="show on the right (shift: on the left)">'
            f'<img src="{esc(url_for(p.ref.preview, page_dir))}" alt="" loading="lazy" decoding="async">'
            f'<span>{esc(p.label)}</span></button></li>'
            for i, p in enumerate(card.panels) if p.ref is not None
        )
        strip = f'<ul class="strip">{thumbs}</ul>'
    panels_json = json.dumps(data, ensure_ascii=False)
    return (f'{head} data-w="{width}" data-h="{height}" data-a="{a}" data-b="{b}" data-panels="{esc(panels_json)}">'
            f'{title}{viewer}{controls}{strip}{tail}')


# ------------------------------------------------------------------------------------------------------------
# Tables and plots


@dataclass
class Column:
    title: str
    numeric: bool = True


def fmt_number(value: float | None, digits: int) -> str:
    if value is None:
        return ""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def cell(value: float | None, digits: int, css: str = "") -> str:
    """A numeric cell: shown rounded, sorted by the exact value (blank sorts last)."""
    raw = "" if value is None else ("Infinity" if value == math.inf else "-Infinity" if value == -math.inf else repr(value))
    cls = f' class="{css}"' if css else ""
    return f'<td{cls} data-v="{raw}">{fmt_number(value, digits)}</td>'


def text_cell(value: str, href: str | None = None) -> str:
    inner = f'<a href="{esc(href)}">{esc(value)}</a>' if href else esc(value)
    return f'<td class="text">{inner}</td>'


def sortable_table(caption: str, columns: Sequence[Column], rows: Iterable[str], table_id: str) -> str:
    head = "".join(
        f'<th{" data-type=num" if c.numeric else " class=text"} scope="col"><button type="button">{esc(c.title)}</button></th>'
        for c in columns
    )
    body = "\n".join(rows)
    return (f'<div class="tablewrap"><table class="sortable" id="{esc(table_id)}"><caption hidden>{esc(caption)}</caption>'
            f"<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table></div>")


PALETTE = ("#2f6fdf", "#d9622b", "#1e9e6a", "#9b4dca", "#c43c6b", "#6b7a12", "#0f8fa8", "#8c5a2b")


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]
    color: str
    dashed: bool = False


def _nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def line_plot(title: str, x_label: str, series: Sequence[Series], width: int = 340, height: int = 230) -> str:
    """An inline SVG line chart (no plotting dependency): one polyline with markers per series."""
    left, right, top = 52, 12, 26
    legend: list[tuple[int, int]] = []  # (x, row) of each series' legend entry, wrapping into rows
    lx, row = left, 0
    for s in series:
        text_w = 7 * len(s.label) + 30
        if lx + text_w > width and lx > left:
            lx, row = left, row + 1
        legend.append((lx, row))
        lx += text_w
    bottom = 44 + 14 * (row + 1)
    height += 14 * row
    points = [p for s in series for p in s.points if math.isfinite(p[1])]
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    # A margin on every side, so the first and last markers sit inside the frame, not cut in half by it.
    x_pad = (x1 - x0) * 0.06 if x1 - x0 >= 1e-9 else 0.05
    x0, x1 = x0 - x_pad, x1 + x_pad
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or max(abs(y0) * 0.05, 0.01)
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="{esc(title)}">',
             f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" font-weight="600">{esc(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#c9ced6"/>']
    for tick in _nice_ticks(y0, y1):
        y = sy(tick)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eceef1"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for tick in sorted(set(xs)):
        x = sx(tick)
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" text-anchor="middle">{tick:g}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 28}" text-anchor="middle">{esc(x_label)}</text>')
    for s in series:
        finite = [(x, y) for x, y in s.points if math.isfinite(y)]
        if not finite:
            continue
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in finite)
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{s.color}" stroke-width="2"{dash}/>')
        for x, y in finite:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{s.color}">'
                         f"<title>{esc(s.label)}: sigma {x:g} = {y:.4g}</title></circle>")
    for s, (lx, row) in zip(series, legend):
        ly = top + plot_h + 44 + 14 * row
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        parts.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{ly - 4}" y2="{ly - 4}" stroke="{s.color}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{lx + 22}" y="{ly}">{esc(s.label)}</text>')
    parts.append("</svg>")
    return "".join(parts)

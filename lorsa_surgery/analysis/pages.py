"""Static pages about heads, rendered from scan stores: an index of every head and one page per head.

Files only, no server and no network: open `index.html` from disk. The index is a table of all scanned heads
(label, firing rate, mean and max activation, dead flag, QK group, promoted tokens) that sorts by any column and
filters as you type. A head page shows its statistics, an activation histogram, its direct logit attribution as a
chart, and examples (the strongest, then across the quantiles of its activations), each in 64 tokens of context with
the head's activation on every token, the source tokens that fed it highlighted by their contribution, and the QK
group's attention at the example token.
"""

from __future__ import annotations

import html
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch
from jinja2 import Environment
from markupsafe import Markup
from torch import nn

from lorsa_surgery.analysis.attribution import one_head
from lorsa_surgery.analysis.scan import HeadStore, scan
from lorsa_surgery.host.splicing import Splice
from lorsa_surgery.interventions.edits import splice_of
from lorsa_surgery.interventions.heads import HeadSpec
from lorsa_surgery.io import files

BEFORE, AFTER = 48, 16
"""Tokens of context shown before and after an example token (65 in all, shifted near a window's edge)."""


def _template(name: str):
    text = resources.files("lorsa_surgery.templates").joinpath(name).read_text(encoding="utf-8")
    return Environment(autoescape=True).from_string(text)


class _Texts:
    """Token ids to their text, decoded once each, with newlines and tabs made visible."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            text = self.tokenizer.decode([token]) if self.tokenizer is not None else f"<{token}>"
            self.cache[token] = text.replace("\n", "\u21b5").replace("\t", "\u21e5")
        return self.cache[token]


LEVELS = 10
"""Colour steps of token highlights: classes p1..p10 (positive, orange) and n1..n10 (negative, blue), and u1..u5
(attention underlines). Classes rather than inline styles keep a page about one head in tens of kilobytes."""


def _level(value: float, scale: float, levels: int = LEVELS, floor: float = 0.0) -> int:
    """0 (nothing to show) .. levels, by |value| / scale; values under `floor` x scale show nothing, any other
    non-zero value at least level 1."""
    ratio = abs(value) / scale if scale > 0 else 0.0
    return 0 if ratio == 0 or ratio < floor else max(1, min(levels, round(levels * ratio)))


def _token_row(texts: _Texts, ids: list[int], start: int, values: list[float], focus: int,
               attention: list[float] | None = None, titled: bool = True, floor: float = 0.0) -> Markup:
    """One row of token spans shaded by `values` (activation or contribution), the focus token outlined; with
    `attention`, tokens are also underlined as strongly as the attention on them. `titled`: hovering a shaded
    token shows its position and value; `floor`: values under this fraction of the largest stay unshaded."""
    scale = max((abs(v) for v in values), default=0.0)
    top = max(attention, default=0.0) if attention else 0.0
    spans = []
    for j, (token, value) in enumerate(zip(ids, values)):
        classes = []
        if level := _level(value, scale, floor=floor):
            classes.append(f"{'p' if value > 0 else 'n'}{level}")
        if attention and (under := _level(attention[j], top, 5, floor=0.2)):
            classes.append(f"u{under}")
        if start + j == focus:
            classes.append("focus")
        attrs = f' class="{" ".join(classes)}"' if classes else ""
        if titled and value:
            attrs += f' title="{start + j}: {value:.3g}"'
        spans.append(f"<span{attrs}>{html.escape(texts(token))}</span>")
    return Markup("".join(spans))


def _svg_bars(values: list[float], labels: list[str], width: int = 360, height: int = 140, horizontal: bool = False) -> Markup:
    """A small self-contained SVG bar chart (orange positive, blue negative)."""
    if not values:
        return Markup("")
    biggest = max(abs(v) for v in values) or 1.0
    parts = []
    if horizontal:
        row = 16
        height = row * len(values) + 4
        middle = width / 2
        for i, (v, label) in enumerate(zip(values, labels)):
            w = (width / 2 - 4) * abs(v) / biggest
            x = middle if v >= 0 else middle - w
            color = "#e07b00" if v >= 0 else "#3b6fd8"
            text_x, anchor = (middle - 4, "end") if v >= 0 else (middle + 4, "start")
            parts.append(f'<rect x="{x:.1f}" y="{i * row + 2}" width="{w:.1f}" height="{row - 4}" fill="{color}"><title>{html.escape(label)}: {v:+.4g}</title></rect>'
                         f'<text x="{text_x}" y="{i * row + row - 4}" text-anchor="{anchor}" font-size="11" font-family="monospace">{html.escape(label)}</text>')
    else:
        step = width / len(values)
        for i, (v, label) in enumerate(zip(values, labels)):
            h = (height - 4) * abs(v) / biggest
            parts.append(f'<rect x="{i * step:.1f}" y="{height - h:.1f}" width="{max(step - 1, 1):.1f}" height="{h:.1f}" fill="#e07b00">'
                         f"<title>{html.escape(label)}: {v:g}</title></rect>")
    return Markup(f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">{"".join(parts)}</svg>')


def head_page(store: HeadStore, tokenizer, column: int, *, row: dict[str, Any] | None = None, texts: _Texts | None = None,
              index_href: str = "../index.html") -> str:
    """The HTML page of one scanned head (`row`: its entry of `store.rows()`, when already at hand)."""
    texts = texts or _Texts(tokenizer)
    row = row or store.rows()[column]
    edges, counts = store.histogram(column)
    histogram = _svg_bars([float(c) for c in counts], [f"{edges[i]:.3g} to {edges[i + 1]:.3g}" for i in range(len(counts))])
    promoted = [(texts(int(t)), float(v)) for t, v in zip(store.dla_tokens[column, 0], store.dla_values[column, 0])]
    suppressed = [(texts(int(t)), float(v)) for t, v in zip(store.dla_tokens[column, 1], store.dla_values[column, 1])]
    dla = _svg_bars([v for _, v in promoted] + [v for _, v in suppressed][::-1],
                    [repr(t) for t, _ in promoted] + [repr(t) for t, _ in suppressed][::-1], width=420, horizontal=True)
    acts = store.activations_at(column)
    sections: dict[int, list[dict[str, Any]]] = {}
    for ex in store.examples(column):
        ids = store.window(ex["window"]).tolist()
        span = BEFORE + AFTER + 1  # near a window's edge, the context shifts rather than shrinks
        hi = min(len(ids), max(ex["position"] + AFTER + 1, span))
        lo = max(0, min(ex["position"] - BEFORE, hi - span))
        shown = ids[lo:hi]
        contributions = ex["contributions"][lo:hi].tolist()
        attention = ex["attention"][lo:hi].tolist()
        sources = sorted(range(len(shown)), key=lambda j: -abs(contributions[j]))[:5]
        sections.setdefault(ex["kind"], []).append({
            "value": ex["value"], "doc": ex["doc"], "offset": ex["offset"], "window": ex["window"], "position": ex["position"],
            "activations": _token_row(texts, shown, lo, [acts.get((ex["window"], lo + j), 0.0) for j in range(len(shown))], ex["position"]),
            # Sources under 5% of the strongest would tint the whole context: left plain.
            "sources": _token_row(texts, shown, lo, contributions, ex["position"], attention, titled=False, floor=0.05),
            "top_sources": [(lo + j, texts(shown[j]), contributions[j]) for j in sources if contributions[j] != 0],
            "z": sum(ex["contributions"].tolist()),
        })
    bands = int(store.settings.get("bands", 0))
    titles = {0: "Strongest activations"}
    titles.update({q: f"Quantile band {q} of {bands} (activations from the {100 * (q - 1) // max(bands, 1)}th to the "
                      f"{100 * q // max(bands, 1)}th percentile)" for q in range(1, bands + 1)})
    siblings = [int(h) for h in store.heads if int(h) // store.group_size == row["qk_group"] and int(h) != row["index"]]
    return _template("head.html.jinja").render(
        row=row, layer=store.layer, n_tokens=store.n_tokens, top_k=store.top_k, group_size=store.group_size,
        histogram=histogram, edges=edges, dla=dla, promoted=promoted, suppressed=suppressed,
        sections=[(titles.get(kind, f"band {kind}"), examples) for kind, examples in sorted(sections.items())],
        siblings=siblings[:24], n_siblings=len(siblings), index_href=index_href,
    )


def index_page(stores: list[HeadStore], tokenizer, texts: _Texts | None = None, rows: list[list[dict]] | None = None) -> str:
    """The HTML index of every head of the stores, linking each to its page in heads/ (`rows`: each store's
    `rows()`, when already at hand)."""
    texts = texts or _Texts(tokenizer)
    rows = [{**row, "promoted_text": ", ".join(repr(texts(t)) for t in row["promoted"][:3])}
            for store_rows in (rows or [store.rows() for store in stores]) for row in store_rows]
    return _template("index.html.jinja").render(rows=rows, layers=[s.layer for s in stores],
                                               tokens=stores[0].n_tokens if stores else 0)


def write_site(stores: list[HeadStore], tokenizer, folder: str | Path, heads: list[str] | None = None) -> Path:
    """index.html and heads/<L.H>.html for every scanned head (or only `heads`, by ref) under `folder`."""
    folder = Path(folder)
    texts = _Texts(tokenizer)
    wanted = set(heads) if heads is not None else None
    rows = [store.rows() for store in stores]
    for store, store_rows in zip(stores, rows):
        for column, row in enumerate(store_rows):
            if wanted is None or row["head"] in wanted:
                files.write_text(folder / "heads" / f"{row['head']}.html", head_page(store, tokenizer, column, row=row, texts=texts))
    return files.write_text(folder / "index.html", index_page(stores, tokenizer, texts, rows))


def dashboard(
    target: Splice | nn.Module,
    tokenizer,
    head: HeadSpec,
    windows: Sequence[torch.Tensor],
    path: str | Path,
    *,
    k: int = 10,
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Scan the windows for one head and write its self-contained HTML page to `path` (`lorsa_surgery.analysis.pages`); to
    look at many heads, scan once with `heads scan` instead."""

    handle = splice_of(target)
    ref = one_head(head, handle)
    windows = [(i, 0, torch.as_tensor(w).reshape(-1)) for i, w in enumerate(windows)]
    store = scan(handle, windows, ref.layer, [ref.index], k=k, batch_size=batch_size, progress=progress)
    return files.write_text(path, head_page(store, tokenizer, 0, index_href="index.html"))

"""The page of a circuit graph (`lorsa_surgery.analysis.circuits.Graph`): one self-contained HTML file, inline SVG and
a little inline script, no network and no external font, that opens from disk.

Layers are rows (the first at the bottom), positions are columns labelled by their tokens. A node is a circle sized by
|attribution| and coloured by its sign; an edge is a curve coloured by its kind (query, key, value), as wide as its
|weight| and dashed when negative. Hovering a node shows its head, label, position, attribution and the tokens its
output direction promotes, and lights up its edges; a node whose head has a page in a scan folder links to it.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from lorsa_surgery.analysis.circuits import Graph
from lorsa_surgery.io import files

KIND_COLOURS = {"q": "#8e44ad", "k": "#16a085", "v": "#e67e22"}
KIND_NAMES = {"q": "query", "k": "key", "v": "value"}
SIGN_COLOURS = ("#c0392b", "#2f6fd8")
"""Nodes that push the metric up, and down."""
ROW, LEFT, TOP, BOTTOM, COLUMN, SPACING, LINES = 120, 70, 30, 70, 40, 30, 3
"""Layout in pixels: a layer's height, the margins, a position's least width, the distance between heads at one place,
and the lines they stand in."""


def scan_links(graph: Graph, scan: str | Path | None, out: str | Path) -> dict[str, str]:
    """{head: link to its page in a scan folder (`heads scan`, `heads/<L.H>.html`), relative to the folder `out`} for
    the graph's heads that have one."""
    if scan is None:
        return {}
    pages = Path(scan) / "heads"
    return {head: os.path.relpath(pages / f"{head}.html", out).replace(os.sep, "/")
            for head in graph.heads() if (pages / f"{head}.html").is_file()}


def _layout(graph: Graph) -> tuple[dict[str, tuple[float, float, float]], list[int], list[float], int, int]:
    """Each node's (x, y, radius), the layers shown (bottom to top), each position's left edge, and the page's width
    and height. The heads at one layer and position stand in up to three lines, so a position is as wide as its
    fullest place needs."""
    layers = sorted({node["layer"] for node in graph.nodes})
    biggest = max((abs(node["attribution"]) for node in graph.nodes), default=0.0) or 1.0
    cells: dict[tuple[int, int], list[dict]] = {}
    for node in graph.nodes:
        cells.setdefault((node["layer"], node["position"]), []).append(node)
    fullest = [max((len(members) for (_, p), members in cells.items() if p == position), default=0)
               for position in range(len(graph.tokens))]
    widths = [max(COLUMN, SPACING * -(-n // LINES) + 8) for n in fullest]
    lefts = [LEFT + sum(widths[:p]) for p in range(len(widths) + 1)]
    width, height = int(lefts[-1] + 20), TOP + ROW * max(len(layers), 1) + BOTTOM
    placed = {}
    for (layer, position), members in cells.items():
        members.sort(key=lambda n: -abs(n["attribution"]))
        lines = min(LINES, len(members))
        across = -(-len(members) // lines)
        for i, node in enumerate(members):
            x = lefts[position] + widths[position] / 2 + SPACING * (i // lines - (across - 1) / 2)
            y = TOP + ROW * (len(layers) - 1 - layers.index(layer)) + ROW / 2 + 34 * (i % lines - (lines - 1) / 2)
            placed[node["id"]] = (x, y, 3 + 10 * (abs(node["attribution"]) / biggest) ** 0.5)
    return placed, layers, lefts, width, height


def _shown(token: str) -> str:
    """A token as an axis label: escapes visible, spaces as ␣, at most 8 characters."""
    return repr(token)[1:-1].replace(" ", "\u2423")[:8]


def circuit_page(graph: Graph, links: dict[str, str] | None = None) -> str:
    """The HTML page of a graph; `links` maps heads to their scan pages (`scan_links`)."""
    links = links or {}
    placed, layers, lefts, width, height = _layout(graph)
    esc = lambda value: html.escape(str(value), quote=True)
    parts = []
    for i, layer in enumerate(reversed(layers)):
        y = TOP + ROW * i
        parts.append(f'<rect x="{LEFT}" y="{y}" width="{width - LEFT - 20}" height="{ROW}" fill="{"#f7f7f9" if i % 2 else "#ffffff"}"/>'
                     f'<text x="{LEFT - 8}" y="{y + ROW / 2 + 4}" text-anchor="end" class="axis">layer {layer}</text>')
    for position, token in enumerate(graph.tokens):
        x = (lefts[position] + lefts[position + 1]) / 2
        parts.append(f'<text x="{x}" y="{height - BOTTOM + 22}" text-anchor="middle" class="token">{esc(_shown(token))}</text>'
                     f'<text x="{x}" y="{height - BOTTOM + 40}" text-anchor="middle" class="axis">{position}</text>')
    heaviest = max((abs(edge["weight"]) for edge in graph.edges), default=0.0) or 1.0
    for i, edge in enumerate(sorted(graph.edges, key=lambda e: abs(e["weight"]))):
        if edge["source"] not in placed or edge["target"] not in placed:
            continue
        (x1, y1, _), (x2, y2, _) = placed[edge["source"]], placed[edge["target"]]
        bend = (x1 + x2) / 2 + (12 if edge["kind"] == "q" else -12 if edge["kind"] == "k" else 0)
        dash = ' stroke-dasharray="5 3"' if edge["weight"] < 0 else ""
        title = f'{edge["source"]} \u2192 {edge["target"]} ({KIND_NAMES[edge["kind"]]}): {edge["weight"]:+.4g}'
        parts.append(f'<path class="edge" data-source="{esc(edge["source"])}" data-target="{esc(edge["target"])}" '
                     f'd="M{x1:.1f},{y1:.1f} Q{bend:.1f},{(y1 + y2) / 2:.1f} {x2:.1f},{y2:.1f}" fill="none" '
                     f'stroke="{KIND_COLOURS[edge["kind"]]}" stroke-width="{0.6 + 5 * abs(edge["weight"]) / heaviest:.2f}"{dash}>'
                     f"<title>{esc(title)}</title></path>")
    for node in graph.nodes:
        x, y, r = placed[node["id"]]
        colour = SIGN_COLOURS[node["attribution"] < 0]
        label = f' ({node["label"]})' if node["label"] else ""
        title = f'{node["head"]}{label} at {node["position"]}: {node["attribution"]:+.4g}'
        circle = (f'<circle class="node" data-id="{esc(node["id"])}" cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" fill="{colour}">'
                  f"<title>{esc(title)}</title></circle>")
        name = f'<text x="{x:.1f}" y="{y - r - 3:.1f}" text-anchor="middle" class="name">{esc(node["head"].partition(".")[2])}</text>'
        link = links.get(node["head"])
        parts.append(f'<a href="{esc(link)}">{circle}</a>{name}' if link else circle + name)
    legend = " ".join(f'<span style="color:{colour}">\u2501 {KIND_NAMES[kind]}</span>' for kind, colour in KIND_COLOURS.items())
    # JSON inside a script element: "<" escaped so no string in it can close the element.
    data = json.dumps({node["id"]: {**node, "link": links.get(node["head"], "")} for node in graph.nodes}).replace("<", "\\u003c")
    verification = "".join(f"<li>{esc(name)}: {esc(_summary(value))}</li>" for name, value in graph.verification.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Circuit: {esc(graph.metric)}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; color: #222; }}
h1 {{ font-size: 18px; margin: 0 0 4px; }}
.meta {{ font-size: 13px; color: #555; margin: 2px 0; }}
.axis {{ font-size: 12px; fill: #666; }}
.token {{ font-size: 13px; font-family: monospace; fill: #222; }}
.name {{ font-size: 10px; fill: #333; pointer-events: none; }}
.edge {{ opacity: 0.55; }}
.edge.lit {{ opacity: 1; }}
.edge.dim {{ opacity: 0.08; }}
.node {{ stroke: #222; stroke-width: 0.8; cursor: pointer; }}
#info {{ font-size: 13px; min-height: 3.2em; padding: 6px 8px; border: 1px solid #ddd; background: #fafafa; margin: 8px 0; }}
</style></head><body>
<h1>Circuit for {esc(graph.metric)}</h1>
<p class="meta">clean {graph.clean_metric:.4g}, baseline ({esc(graph.baseline)}) {graph.baseline_metric:.4g};
{len(graph.nodes)} nodes carrying {graph.node_share:.0%} of the total |attribution|, {len(graph.edges)} edges carrying
{graph.edge_share:.0%} of the |weight| between them{f" (MLPs: {esc(graph.mlps)})" if graph.mlps else ""}.
Node area: |attribution|; <span style="color:{SIGN_COLOURS[0]}">&#9679; raises</span>
<span style="color:{SIGN_COLOURS[1]}">&#9679; lowers</span> the metric. Edges: {legend}; dashed: negative.</p>
{f'<ul class="meta">{verification}</ul>' if verification else ""}
<div id="info">Hover a node for its head, label and promoted tokens.</div>
<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">
{"".join(parts)}
</svg>
<script>
const nodes = {data};
const info = document.getElementById("info");
const edges = Array.from(document.querySelectorAll(".edge"));
function text(s) {{ return document.createTextNode(s); }}
document.querySelectorAll(".node").forEach(function (el) {{
  const node = nodes[el.dataset.id];
  el.addEventListener("mouseenter", function () {{
    info.replaceChildren(text(node.head + (node.label ? " (" + node.label + ")" : "") + " at position " + node.position
      + " (" + JSON.stringify(node.token) + "): attribution " + node.attribution.toPrecision(4)));
    if (node.promoted.length) {{
      info.append(document.createElement("br"), text("promotes: " + node.promoted.map(function (t) {{ return JSON.stringify(t); }}).join(", ")));
    }}
    if (node.link) {{ info.append(document.createElement("br"), text("click for its scan page")); }}
    edges.forEach(function (e) {{
      const mine = e.dataset.source === node.id || e.dataset.target === node.id;
      e.classList.toggle("lit", mine); e.classList.toggle("dim", !mine);
    }});
  }});
  el.addEventListener("mouseleave", function () {{ edges.forEach(function (e) {{ e.classList.remove("lit", "dim"); }}); }});
}});
</script>
</body></html>
"""


def _summary(value) -> str:
    """One line for a verification result (`Faithfulness.to_dict`, `Necessity.to_dict`)."""
    if "skipped" in value:
        return f"skipped: {value['skipped']}"
    shares = {k: v for k, v in value.items() if isinstance(v, dict) and "mean" in v}
    return "; ".join(f"{k} {v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" for k, v in shares.items()) + \
        f" over {value.get('prompts', '?')} prompts, {value.get('heads', '?')} heads"


def write_page(graph: Graph, path: str | Path, scan: str | Path | None = None) -> Path:
    """Write the graph's page to `path`, linking heads to their pages in the `scan` folder when given."""
    path = Path(path)
    return files.write_text(path, circuit_page(graph, scan_links(graph, scan, path.parent)))

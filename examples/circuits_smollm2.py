"""Circuits through Lorsa heads on SmolLM2 with every attention layer spliced: the attribution checked against
patching, and the induction circuit found without naming a head (docs/circuits.md).

--modules names the spliced model: a patched model (default: the shipped complete replacement, smollm2-complete; its
LoRA adapters shape every run too) or a folder with a module per layer (L0/ ... L29/, as training keeps them). Measured:

1. Nodes against activation patching, head by head, for IOI and for induction. A head's attribution summed over its
   positions is set against patching that head from the corrupted run at every position (what patching a head
   means to `lorsa-surgery patch` and `Patch`): clean metric minus patched metric. The --heads heads of largest
   |attribution| are patched; Spearman over them, the share of signs that agree, a scatter plot and the heads where
   the two disagree most. Each is patched a second time with every head's firing held at the clean run's
   (`patch_heads(freeze=True)`): what that closes of the gap is the top-K jumps (a head of a later layer switching on
   or off), which no gradient sees; what it leaves is the smooth nonlinearity (attention patterns, norms, softmax).
   - IOI: "When Mary and John went to the store, John gave a drink to", names, places and objects drawn from the
     head-family probe's lists (those written as one token); corrupted: the subject's second mention replaced by
     the indirect object (the demo's corruption: the answer flips). Metric: logit of the indirect object minus
     the subject's, read from each row's own name columns (`LogitDiff(columns=True)`).
   - Induction: a start token and --length random words written twice (the induction family's probe); corrupted:
     the first copy replaced by fresh words. The second copy (every query and every token scored) stays the same
     and only the earlier occurrence goes, so a previous-token head working at the first copy differs between
     the runs and can be found; corrupting the second copy instead would leave the first copy's activations as
     they were, and those heads invisible. Metric: `RepeatGain`, the mean log-probability of the repeated tokens
     in the second copy minus in the first (zero when nothing is copied).
2. Edges against path patching: for each --mlps treatment, the edges into the --targets nodes of largest
   |attribution| (`attribute_edges`), the strongest of each kind in turn (q, k, v) up to --edges, each against
   `path_patch` (one upstream output taken out of one downstream read only), with firing free and frozen (a read
   changed in one head's favour moves every head of that layer, and top-K can switch the downstream head itself on
   or off); Spearman, overall and by kind, and scatter plots.
3. The induction circuit: the induction attribution pruned (`prune`, --node-share, at most --max-nodes nodes), and
   on --verify-prompts fresh induction prompts its faithfulness and its necessity against the firing-matched control,
   with 95% bootstrap intervals; its heads' overlap with the previous-token and induction heads (labels
   `previous_token`, `induction` and `induction_attention`: the modules' catalogs, or `detect` on a layer whose
   catalog is empty) against chance (a random set of as many heads drawn from the heads that fire); and of the edges
   into the circuit's induction nodes (at most --targets), the share of each kind's weight that previous-token
   heads send (the mechanism predicts keys).

4. What feeds IOI's name movers (the heads the catalogs label name movers, never picked by the attribution): their
   share of the IOI attribution at the last position, and the Q/K/V edges into the --targets strongest of them there,
   with the strongest sources of their queries.

--parts runs some of these (patching: 1 and 2; circuit: 3; name-movers: 4). Writes report.json, report.md and scatter plots (ioi_nodes.png, induction_nodes.png, ioi_edges_MLPS.png,
induction_edges_MLPS.png) to --out and prints report.md.

    python examples/circuits_smollm2.py --out runs/circuits                   # the full run (see --help)
    python examples/circuits_smollm2.py --out runs/circuits-fast --fast       # small sizes (for tests)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import lorsa_surgery as ls
from lorsa_surgery.analysis.circuits import (KINDS, NodeAttribution, attribute, attribute_edges, faithfulness, head_stats,
                                             necessity, patch_heads, path_patch, prune, spearman)
from lorsa_surgery.analysis.families import catalog_entries, detect, induction_pairs, ioi_pairs
from lorsa_surgery.publishing.patched import every_layer, is_patched_folder

FAMILIES = {"previous_token": ("previous_token",), "induction": ("induction", "induction_attention")}
"""The catalog labels that count as each family of the induction mechanism."""
NAME_MOVERS = {"name_mover": ("name_mover", "name_mover_attention")}
PARTS = ("patching", "circuit", "name-movers")


def load(spec: str):
    """(model, tokenizer, handle): a patched model as saved (adapters included; a folder, a Hub id or a shipped name),
    or SmolLM2 with a module per layer (a folder of them, or from-attention: exact copies, their MHSA heads as nodes)."""
    if spec != "from-attention" and (is_patched_folder(spec) or not Path(spec).is_dir()):
        return ls.load_patched(spec)
    model, tokenizer = ls.load_model("smollm2")
    specs = every_layer(spec, model.config.num_hidden_layers)
    return model, tokenizer, ls.splice(model, {layer: ls.module_for(model, layer, s) for layer, s in specs.items()})


# ---- 1. nodes against patching ------------------------------------------------------------------------------------


def nodes_against_patching(nodes: NodeAttribution, metric, n_heads: int, batch_size: int, n_cases: int = 5) -> dict:
    top = nodes.top_heads(n_heads)
    heads, ours = [h for h, _ in top], [v for _, v in top]
    true = patch_heads(nodes, metric, heads, batch_size=batch_size).tolist()
    frozen = patch_heads(nodes, metric, heads, freeze=True, batch_size=batch_size).tolist()
    rows = [{"head": h, "attribution": a, "patching": p, "frozen": f} for h, a, p, f in zip(heads, ours, true, frozen)]
    by_gap = sorted(rows, key=lambda r: -abs(r["attribution"] - r["patching"]))
    gap = lambda key: sum(abs(r["attribution"] - r[key]) for r in rows) / max(1e-12, sum(abs(r[key]) for r in rows))
    return {
        "metric": nodes.metric, "clean": nodes.clean_metric, "baseline": nodes.baseline_metric,
        "attribution_total": nodes.total(), "heads_attributed": len(nodes.top_heads()), "heads": rows,
        "spearman": spearman(ours, true) if len(rows) > 2 else None,
        "spearman_frozen": spearman(ours, frozen) if len(rows) > 2 else None,
        "relative_gap": gap("patching"), "relative_gap_frozen": gap("frozen"),
        "sign_agreement": sum((a > 0) == (p > 0) for a, p in zip(ours, true)) / max(1, len(rows)),
        "disagree": by_gap[:n_cases],
    }


# ---- 2. edges against path patching -------------------------------------------------------------------------------


def edges_against_path_patching(nodes: NodeAttribution, metric, n_edges: int, targets: int, mlps: str) -> dict:
    edges = attribute_edges(nodes, top=targets, mlps=mlps)
    by_kind = {k: sorted((r for r in edges.records() if r[2] == k), key=lambda r: -abs(r[3])) for k in KINDS}
    sample = []
    for rank in range(max(map(len, by_kind.values()), default=0)):  # the strongest of each kind in turn: a mix
        sample += [by_kind[k][rank] for k in KINDS if rank < len(by_kind[k])]
    sample = sample[:n_edges]
    rows = [{"source": s, "target": t, "kind": k, "attribution": w, "path_patching": path_patch(nodes, metric, s, t, k, mlps),
             "frozen": path_patch(nodes, metric, s, t, k, mlps, freeze=True)} for s, t, k, w in sample]
    correlation = lambda rs, key: spearman([r["attribution"] for r in rs], [r[key] for r in rs]) if len(rs) > 2 else None
    return {"mlps": mlps, "targets": edges.targets, "edges_attributed": len(edges.weight), "edges": rows,
            "spearman": correlation(rows, "path_patching"), "spearman_frozen": correlation(rows, "frozen"),
            "by_kind": {k: correlation([r for r in rows if r["kind"] == k], "path_patching") for k in KINDS},
            "by_kind_frozen": {k: correlation([r for r in rows if r["kind"] == k], "frozen") for k in KINDS}}


# ---- 3. the induction circuit ------------------------------------------------------------------------------------


def family_heads(nodes: NodeAttribution, model, tokenizer, n_prompts: int,
                 families: dict[str, tuple[str, ...]] = FAMILIES) -> tuple[dict[str, set[str]], list[int]]:
    """{family: nodes' heads labelled with it (`L3.H12`; on an exact copy the MHSA head of a labelled part, `L3.A0`)}
    from each layer's catalog, or from `detect` where a layer's catalog is empty; and the layers detected."""
    handle = nodes.run.handle
    found: dict[str, set[str]] = {family: set() for family in families}
    detected = []
    for layer in handle.layers:
        catalog = handle[layer].source.catalog
        if not catalog:
            scores = detect(model, tokenizer, layer, handle[layer].lorsa, list(families), n_prompts=n_prompts)
            catalog = catalog_entries(scores)
            detected.append(layer)
        for head, entry in catalog.items():
            for family, labels in families.items():
                if entry.get("label") in labels:
                    found[family].add(nodes.names[layer][int(head) // nodes.widths[layer]])
    return found, detected


def overlap(circuit: set[str], labelled: set[str], firing: set[str]) -> dict:
    """Circuit heads with a label against a random set of as many heads that fire: expected overlap and the chance of
    at least the overlap seen (hypergeometric)."""
    N, K, n = len(firing), len(labelled & firing), len(circuit)
    seen = len(circuit & labelled)
    tail = sum(math.comb(K, k) * math.comb(N - K, n - k) for k in range(seen, min(K, n) + 1)) / math.comb(N, n) if n <= N else 0.0
    return {"circuit": n, "labelled_firing": K, "firing": N, "overlap": seen, "expected": n * K / N if N else 0.0,
            "p_value": tail}


def induction_circuit(handle, model, tokenizer, nodes: NodeAttribution, metric, args) -> dict:
    graph = prune(nodes, node_share=args.node_share, tokenizer=tokenizer, max_nodes=args.max_nodes)
    clean, _ = induction_pairs(tokenizer, args.verify_prompts, args.length, seed=1000)  # prompts not attributed on
    prompts = [row[None] for row in clean]
    stats = head_stats(handle, prompts)
    faithful = faithfulness(handle, prompts, graph, metric, stats=stats)
    needed = necessity(handle, prompts, graph, metric, stats=stats)
    families, detected = family_heads(nodes, model, tokenizer, args.family_prompts)
    firing = {nodes.names[layer][h // nodes.widths[layer]] for layer in handle.layers
              for h in (stats.rates[layer] > 0).nonzero().flatten().tolist()}
    heads = set(graph.heads())
    chance = {family: overlap(heads, labelled, firing) for family, labelled in families.items()}
    chance["either"] = overlap(heads, set().union(*families.values()), firing)
    # The mechanism predicts that previous-token heads feed induction heads through their keys: of the edges into the
    # circuit's induction nodes, the share of each kind's weight that comes from previous-token heads.
    inductive = [node["id"] for node in graph.nodes if node["head"] in families["induction"]][: args.targets]
    into = attribute_edges(nodes, inductive, mlps=args.mlps[0]).records() if inductive else []
    weight = {k: [0.0, 0.0] for k in KINDS}  # from previous-token heads, from every head
    for source, _, kind, w in into:
        weight[kind][0] += abs(w) if source.partition("@")[0] in families["previous_token"] else 0.0
        weight[kind][1] += abs(w)
    composed = {"targets": len(inductive), "edges": len(into), "mlps": args.mlps[0],
                "share": {k: a / b if b else None for k, (a, b) in weight.items()},
                "firing_share": chance["previous_token"]["labelled_firing"] / max(1, len(firing))}
    return {"nodes": len(graph.nodes), "heads": sorted(heads), "node_share": args.node_share, "max_nodes": args.max_nodes,
            "faithfulness": faithful.to_dict(), "necessity": needed.to_dict(), "labelled": {f: len(h) for f, h in families.items()},
            "detected_layers": detected, "overlap": chance, "previous_token_to_induction": composed,
            "top_nodes": [{k: node[k] for k in ("id", "token", "attribution", "label")} for node in graph.nodes[:15]]}


def name_mover_inputs(nodes: NodeAttribution, model, tokenizer, args) -> dict:
    """IOI's name movers, as catalogued (never picked by the attribution): their share of the attribution at the last
    position, and what feeds the strongest of them there, by kind, with the strongest sources of their query edges."""
    movers = family_heads(nodes, model, tokenizer, args.family_prompts, NAME_MOVERS)[0]["name_mover"]
    last = nodes.input_ids.shape[1] - 1
    at_last = [(key, value) for key, value in nodes.top() if key.endswith(f"@{last}")]
    mine = [(key, value) for key, value in at_last if key.partition("@")[0] in movers]
    targets = [key for key, _ in mine[: args.targets]]
    into = attribute_edges(nodes, targets, mlps=args.mlps[0]).records() if targets else []
    by_kind = {k: sum(abs(w) for _, _, kind, w in into if kind == k) for k in KINDS}
    queries: dict[str, float] = {}
    for source, _, kind, w in into:
        if kind == "q":
            queries[source] = queries.get(source, 0.0) + w
    tokens = nodes.input_ids[0].tolist()
    total = sum(abs(v) for _, v in at_last)
    return {"catalogued": len(movers), "attributed_at_last": len(mine),
            "share_at_last": sum(abs(v) for _, v in mine) / total if total else None,
            "in_top_20_at_last": sum(key.partition("@")[0] in movers for key, _ in at_last[:20]),
            "targets": [{"id": key, "attribution": value} for key, value in mine[: args.targets]], "mlps": args.mlps[0],
            "kinds": {k: v / sum(by_kind.values()) if any(by_kind.values()) else None for k, v in by_kind.items()},
            "query_sources": [{"id": key, "weight": w, "token": tokenizer.decode([tokens[int(key.partition("@")[2])]]),
                               "name_mover": key.partition("@")[0] in movers}
                              for key, w in sorted(queries.items(), key=lambda item: -abs(item[1]))[:8]]}


# ---- the report -------------------------------------------------------------------------------------------------


def scatter(path: Path, panels: list[tuple[str, dict[str, tuple[list[float], list[float]]]]], xlabel: str, ylabel: str) -> None:
    """One panel per (title, {series: (x, y)}), y = x dotted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8 * len(panels), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    lim = 1.05 * max([abs(v) for _, points in panels for xs, ys in points.values() for v in xs + ys] or [1.0])
    for ax, (title, points) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.plot([-lim, lim], [-lim, lim], ":", color="gray", lw=1)
        ax.axhline(0, color="lightgray", lw=0.8)
        ax.axvline(0, color="lightgray", lw=0.8)
        for label, (xs, ys) in points.items():
            ax.scatter(xs, ys, s=12, alpha=0.7, label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(-lim, lim), ylim=(-lim, lim))
        if len(points) > 1:
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def plots(report: dict, out: Path) -> None:
    for task in ("ioi", "induction"):
        nodes = report[task]["nodes"]
        rows = nodes["heads"]
        series = {name: ([r["attribution"] for r in rows], [r[key] for r in rows])
                  for name, key in (("patched", "patching"), ("firing frozen", "frozen"))}
        title = f"{task}: {len(rows)} heads, Spearman {fmt(nodes['spearman'])} (frozen {fmt(nodes['spearman_frozen'])})"
        scatter(out / f"{task}_nodes.png", [(title, series)], "attribution (summed over positions)",
                "patching the head at every position")
        for result in report[task]["edges"]:
            edges = result["edges"]
            panels = [(f"{task}: {len(edges)} edges ({result['mlps']}){suffix}, Spearman {fmt(result['spearman' + key])}",
                       {k: ([r["attribution"] for r in edges if r["kind"] == k], [r[column] for r in edges if r["kind"] == k])
                        for k in KINDS})
                      for suffix, key, column in (("", "", "path_patching"), (", firing frozen", "_frozen", "frozen"))]
            scatter(out / f"{task}_edges_{result['mlps']}.png", panels, "edge attribution", "path patching")


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def interval(estimate: dict) -> str:
    return f"{estimate['mean']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}]"


def markdown(report: dict) -> str:
    lines = [f"Modules: {report['modules']} ({report['layers']} layers spliced). IOI: {report['sizes']['ioi_prompts']} "
             f"prompts; induction: {report['sizes']['induction_prompts']} prompts of {report['sizes']['length']} words "
             "written twice.", ""]
    for part, write in (("patching", patching_lines), ("circuit", circuit_lines), ("name-movers", name_mover_lines)):
        if part in report["parts"]:
            lines += write(report) + [""]
    return "\n".join(lines)


def patching_lines(report: dict) -> list[str]:
    lines = ["| task | metric clean | corrupted | attribution total | heads patched | Spearman | signs agree | gap "
             "| Spearman, firing frozen | gap, firing frozen |", "|---|---|---|---|---|---|---|---|---|---|"]
    for task in ("ioi", "induction"):
        n = report[task]["nodes"]
        lines.append(f"| {task} | {n['clean']:.3f} | {n['baseline']:.3f} | {n['attribution_total']:.3f} | {len(n['heads'])} "
                     f"of {n['heads_attributed']} | {fmt(n['spearman'])} | {n['sign_agreement']:.0%} | "
                     f"{n['relative_gap']:.0%} | {fmt(n['spearman_frozen'])} | {n['relative_gap_frozen']:.0%} |")
    lines += ["", "gap: sum of |attribution - patching| over sum of |patching|. Firing frozen: every head fires where it "
              "fired in the clean run (no top-K jumps). Where they disagree most:", "",
              "| task | head | attribution | patching | firing frozen |", "|---|---|---|---|---|"]
    for task in ("ioi", "induction"):
        for r in report[task]["nodes"]["disagree"]:
            lines.append(f"| {task} | {r['head']} | {r['attribution']:+.4f} | {r['patching']:+.4f} | {r['frozen']:+.4f} |")
    lines += ["", "Edges against path patching (Spearman; by kind, with the edges of that kind in the sample):", "",
              "| task | edges | MLPs | firing | Spearman | q | k | v |", "|---|---|---|---|---|---|---|---|"]
    for task in ("ioi", "induction"):
        for e in report[task]["edges"]:
            for firing, key in (("free", ""), ("frozen", "_frozen")):
                kinds = " | ".join(f"{fmt(e['by_kind' + key][k])} ({sum(r['kind'] == k for r in e['edges'])})" for k in KINDS)
                lines.append(f"| {task} | {len(e['edges'])} of {e['edges_attributed']} | {e['mlps']} | {firing} | "
                             f"{fmt(e['spearman' + key])} | {kinds} |")
    return lines


def circuit_lines(report: dict) -> list[str]:
    c = report["circuit"]
    f, n = c["faithfulness"], c["necessity"]
    lines = [f"Induction circuit: {c['nodes']} nodes (at most {c['max_nodes']}), {len(c['heads'])} heads; on "
                  f"{f['prompts']} fresh prompts (repeat gain {f['full']:.3f}, every head mean-ablated {f['empty']:.3f}):", "",
              f"- faithfulness: share kept {interval(f['share'])}, normalised {interval(f['normalised'])}",
              f"- necessity: lost {interval(n['lost'])}, firing-matched control {interval(n['control_lost'])}", "",
              "| family | circuit heads labelled | expected by chance | p | labelled heads that fire | heads that fire |",
              "|---|---|---|---|---|---|"]
    for family, o in c["overlap"].items():
        lines.append(f"| {family} | {o['overlap']} of {o['circuit']} | {o['expected']:.1f} | {o['p_value']:.2g} | "
                     f"{o['labelled_firing']} | {o['firing']} |")
    if c["detected_layers"]:
        lines.append(f"\nLabels from `detect` for the {len(c['detected_layers'])} layers whose catalog is empty.")
    composed = c["previous_token_to_induction"]
    lines += ["", f"Edges ({composed['mlps']}) into the circuit's {composed['targets']} induction nodes: the share of each "
                  "kind's weight that comes from previous-token heads, " + ", ".join(
                      f"{k} {fmt(composed['share'][k], '.0%')}" for k in KINDS)
              + f" (previous-token heads are {composed['firing_share']:.0%} of the heads that fire)."]
    return lines


def name_mover_lines(report: dict) -> list[str]:
    m = report["name_movers"]
    lines = [f"IOI name movers (catalogued: {m['catalogued']} heads): {m['attributed_at_last']} have attribution at the last "
             f"position, {fmt(m['share_at_last'], '.0%')} of its |attribution|, {m['in_top_20_at_last']} of its 20 strongest "
             f"nodes. Edges ({m['mlps']}) into the {len(m['targets'])} strongest ("
             + ", ".join(f"{t['id']} {t['attribution']:+.3f}" for t in m["targets"]) + "): share of |weight| by kind, "
             + ", ".join(f"{k} {fmt(m['kinds'][k], '.0%')}" for k in KINDS) + ". Strongest sources of their queries:", "",
             "| source | token | query edge weight | name mover |", "|---|---|---|---|"]
    lines += [f"| {q['id']} | {q['token']!r} | {q['weight']:+.4f} | {'yes' if q['name_mover'] else ''} |" for q in m["query_sources"]]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", default="smollm2-complete",
                        help="A patched model (folder, Hub id or shipped name), a folder with a module per layer (L0/, L1/, "
                             "...) or from-attention.")
    parser.add_argument("--out", type=Path, required=True, help="Folder for report.json, report.md and the plots.")
    parser.add_argument("--ioi-prompts", type=int, default=16, help="IOI prompt pairs attributed and patched together.")
    parser.add_argument("--induction-prompts", type=int, default=16, help="Induction prompt pairs attributed and patched together.")
    parser.add_argument("--length", type=int, default=20, help="Words in each copy of an induction prompt.")
    parser.add_argument("--heads", type=int, default=200, help="Heads of largest |attribution| patched, per task.")
    parser.add_argument("--edges", type=int, default=50, help="Edges path-patched, per task and treatment of MLPs.")
    parser.add_argument("--targets", type=int, default=10, help="Downstream nodes whose edges are attributed.")
    parser.add_argument("--mlps", nargs="+", choices=("direct", "linearised"), default=["direct", "linearised"],
                        help="Treatments of MLPs for edges (the induction circuit's use the first).")
    parser.add_argument("--node-share", type=float, default=0.8, help="Share of the |attribution| the circuit's nodes carry.")
    parser.add_argument("--max-nodes", type=int, default=200, help="At most this many nodes in the circuit.")
    parser.add_argument("--verify-prompts", type=int, default=32, help="Fresh induction prompts for faithfulness and necessity.")
    parser.add_argument("--family-prompts", type=int, default=16, help="Prompts per family for `detect` on uncatalogued layers.")
    parser.add_argument("--batch-size", type=int, default=32, help="Rows per forward pass when patching heads.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="What to run: patching (nodes and edges of both tasks against patching), circuit (the "
                             "induction circuit) and name-movers (what feeds IOI's name movers).")
    parser.add_argument("--fast", action="store_true", help="Small sizes throughout (for tests).")
    args = parser.parse_args()
    if args.fast:
        args.ioi_prompts, args.induction_prompts, args.length, args.heads, args.edges, args.targets = 4, 4, 8, 24, 9, 3
        args.mlps, args.max_nodes, args.verify_prompts, args.family_prompts = args.mlps[:1], 30, 6, 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer, handle = load(args.modules)
    report = {"modules": str(args.modules), "layers": len(handle.layers), "parts": args.parts,
              "sizes": {k: getattr(args, k) for k in ("ioi_prompts", "induction_prompts", "length", "heads", "edges", "targets")}}
    clean, corrupt, ioi_metric = ioi_pairs(tokenizer, args.ioi_prompts, seed=0)
    tasks = {"ioi": (clean, corrupt, ioi_metric),
             "induction": (*induction_pairs(tokenizer, args.induction_prompts, args.length, seed=0), ls.RepeatGain(args.length))}
    needed = {"patching": ("ioi", "induction"), "circuit": ("induction",), "name-movers": ("ioi",)}
    attributed = {task: attribute(handle, clean, metric, corrupt) for task, (clean, corrupt, metric) in tasks.items()
                  if any(task in needed[part] for part in args.parts)}
    if "patching" in args.parts:
        for task, (_, _, metric) in tasks.items():
            nodes = attributed[task]
            report[task] = {"nodes": nodes_against_patching(nodes, metric, args.heads, args.batch_size),
                            "edges": [edges_against_path_patching(nodes, metric, args.edges, args.targets, mlps) for mlps in args.mlps]}
            n = report[task]["nodes"]
            print(f"{task}: node Spearman {fmt(n['spearman'])} (firing frozen {fmt(n['spearman_frozen'])}), edge Spearman "
                  + ", ".join(f"{e['mlps']} {fmt(e['spearman'])} ({fmt(e['spearman_frozen'])})" for e in report[task]["edges"]),
                  flush=True)
    if "circuit" in args.parts:
        report["circuit"] = induction_circuit(handle, model, tokenizer, attributed["induction"], tasks["induction"][2], args)
    if "name-movers" in args.parts:
        report["name_movers"] = name_mover_inputs(attributed["ioi"], model, tokenizer, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    (args.out / "report.md").write_text(markdown(report))
    if "patching" in args.parts:
        plots(report, args.out)
    print((args.out / "report.md").read_text())


if __name__ == "__main__":
    main()

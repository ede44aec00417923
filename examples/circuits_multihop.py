"""Circuits on a multi-hop GPT-J with every attention layer replaced by Lorsa (docs/circuits.md, docs/multihop.md).

The question: the number-task model has positional heads in layers 1-2 and symbolic ones in layers 4-5. Once every
layer is a Lorsa module, does the circuit behind an answer use positional QK heads in layers 1-2 and symbolic ones in
layers 4-5, and do symbolic heads take their upstream input through their keys (matching by content), positional ones
through their queries (the pointer read at the query) and keys?

1. Train the number model with the small preset (reusing or resuming the run in OUT/run).
2. Fit a Lorsa module for every layer (4 QK heads, 256 OV heads, K 16) on the original model's attention input and
   output (`lorsa_surgery.multihop.fitting.fit_lorsa`), kept in OUT/lorsa/L0 ... and reused when fitted with the
   same settings; held-out explained variance per layer. Each module's QK heads are scored positional or symbolic
   (`positional.head_scores(..., lorsa=...)`); each OV head inherits its QK head's class (`HeadScores.expand`).
3. Splice all six; task accuracy spliced against original on fresh prompts, per hop count.
4. For each hop count, prompts whose chain follows one fixed path (the query at 16 to pre-target positions to the
   answer in window slot 2, `PATHS`), corrupted by changing one link: the pointer into the window now points to slot 5,
   so the answer becomes another symbol and nothing else moves. Metric: logit of the answer (column 2) minus that of
   the symbol in slot 5 (`LogitDiff(2, 5, columns=True)`). Node attribution against the corrupted run, the graph pruned
   to --node-share of the |attribution|, its faithfulness and necessity (against a firing-matched control) with
   bootstrap intervals on fresh prompts of the same path, and the Q/K/V edges into its top nodes (both treatments of
   MLPs: GPT-J's MLP reads the block input beside the attention, so `direct` edges see only the residual stream).
5. The circuit's heads by layer and class, and the edges into positional and into symbolic heads by kind.

Writes report.json and report.md to --out and prints report.md.

    python examples/circuits_multihop.py --out runs/circuits-multihop          # 12 minutes on one thread, half training
    python examples/circuits_multihop.py --out runs/circuits-multihop-fast --fast
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import lorsa_surgery as ls
from lorsa_surgery.analysis.circuits import KINDS, Graph, attribute, attribute_edges, faithfulness, head_stats, necessity, prune
from lorsa_surgery.io import files
from lorsa_surgery.multihop import positional
from lorsa_surgery.multihop import train as training
from lorsa_surgery.multihop.fitting import fit_lorsa, task_prompts
from lorsa_surgery.multihop.tasks import PRE_TARGET, WINDOW, TaskTokenizer, generate

QUERY = WINDOW + PRE_TARGET
"""The query's position (the last of the 17 input tokens)."""
ANSWER_SLOT, CORRUPT_SLOT = 2, 5
"""Window slots of the answer and of the symbol the corrupted chain reaches instead."""
PATHS = {1: [ANSWER_SLOT], 2: [12, ANSWER_SLOT], 3: [12, 10, ANSWER_SLOT], 4: [12, 10, 9, ANSWER_SLOT]}
"""Per hop count, the positions the chain visits after the query: one fixed path, so that every row's nodes sit at
the same positions."""
METRIC = ls.LogitDiff(ANSWER_SLOT, CORRUPT_SLOT, columns=True)
"""Logit of the answer (read from column ANSWER_SLOT of each row) minus that of the symbol in CORRUPT_SLOT."""
CLASSES = ("positional", "symbolic", "mixed")


def chain(tokens: list[str]) -> list[int]:
    """The positions a number-task prompt's pointers visit from the query, the answer last."""
    here, path = len(tokens) - 1, []
    while tokens[here].isdigit():
        here -= int(tokens[here])
        path.append(here)
    return path


def path_pairs(hops: int, n: int, seed: str) -> tuple[torch.Tensor, torch.Tensor]:
    """n prompts of `hops` hops following PATHS[hops] (drawn from the task's generator and kept when they follow it)
    and the same prompts with the last link pointing to CORRUPT_SLOT instead, as ids [n, 17]."""
    found, batch = [], 0
    while len(found) < n:
        found += [e.tokens for e in generate("number", 4096, seed=f"{seed}-{batch}", hops=(hops,)) if chain(e.tokens) == PATHS[hops]]
        batch += 1
    clean = found[:n]
    link = ([QUERY] + PATHS[hops])[-2]  # the position that points into the window
    corrupt = [t[:link] + [str(link - CORRUPT_SLOT)] + t[link + 1 :] for t in clean]
    tok = TaskTokenizer("number")
    return torch.tensor([tok.encode(t) for t in clean]), torch.tensor([tok.encode(t) for t in corrupt])


class SymbolText:
    """The task's tokens as text, for `prune` (which reads a tokenizer's `decode`)."""

    def __init__(self) -> None:
        self.tokenizer = TaskTokenizer("number")

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.tokenizer.decode(ids))


# ---- 1-3. the model, its modules, the splice -----------------------------------------------------------------------


def lorsa_modules(model, args, out: Path, model_step: int) -> tuple[dict[int, ls.Lorsa], dict[int, dict]]:
    """A fitted module per layer, reused from out/lorsa when fitted with the same settings, and each one's fit record
    (settings, explained variance, seconds, and whether it was reused)."""
    settings = {"model_step": model_step, "steps": args.lorsa_steps, "prompts": args.fit_prompts}
    record_path = out / "lorsa" / "fits.json"
    records = files.read_json(record_path) if record_path.is_file() else {}
    modules, reused = {}, set()
    for layer in range(model.config.n_layer):
        folder = out / "lorsa" / f"L{layer}"
        if records.get(str(layer), {}).get("settings") == settings and folder.is_dir():
            modules[layer] = ls.Lorsa.from_pretrained(folder)
            reused.add(layer)
            continue
        t0 = time.time()
        modules[layer], ev = fit_lorsa(model, "number", layer, steps=args.lorsa_steps, prompts=args.fit_prompts)
        modules[layer].save_pretrained(folder, overwrite=True)
        records[str(layer)] = {"settings": settings, "explained_variance": ev, "seconds": time.time() - t0}
        files.write_json(record_path, records)
        print(f"fitted L{layer}: explained variance {ev:.4f} in {time.time() - t0:.0f} s", flush=True)
    return modules, {layer: {**records[str(layer)], "reused": layer in reused} for layer in modules}


def qk_classes(model, modules: dict[int, ls.Lorsa], n_prompts: int) -> tuple[positional.HeadScores, positional.HeadScores]:
    """(scores of each module's QK heads, scores of the original model's MHSA heads) on the same prompts."""
    ids = task_prompts("number", n_prompts, "scores")
    return positional.head_scores(model, ids, lorsa=modules, progress=False), positional.head_scores(model, ids, progress=False)


# ---- 4-5. circuits ---------------------------------------------------------------------------------------------------


def head_class(head: str, labels: dict[int, list[str]]) -> str:
    """`L4.H17` -> the class its QK head was given."""
    layer, index = head[1:].split(".H")
    return labels[int(layer)][int(index)]


def by_layer(graph: Graph, labels: dict[int, list[str]], layers: list[int]) -> dict[int, dict[str, dict]]:
    """Per layer and class, the circuit's heads and their share of the circuit's |attribution|."""
    total = sum(abs(node["attribution"]) for node in graph.nodes) or 1.0
    out = {layer: {c: {"heads": set(), "share": 0.0} for c in CLASSES} for layer in layers}
    for node in graph.nodes:
        cell = out[node["layer"]][head_class(node["head"], labels)]
        cell["heads"].add(node["head"])
        cell["share"] += abs(node["attribution"]) / total
    return {layer: {c: {"heads": len(v["heads"]), "share": v["share"]} for c, v in row.items()} for layer, row in out.items()}


def by_place(graph: Graph, least: float = 0.05) -> dict[str, float]:
    """`L2@12` -> the share of the circuit's |attribution| its nodes of that layer at that position carry (at least
    `least`), largest first."""
    total = sum(abs(node["attribution"]) for node in graph.nodes) or 1.0
    cells: dict[str, float] = {}
    for node in graph.nodes:
        key = f"L{node['layer']}@{node['position']}"
        cells[key] = cells.get(key, 0.0) + abs(node["attribution"]) / total
    return {k: v for k, v in sorted(cells.items(), key=lambda kv: -kv[1]) if v >= least}


def edge_shares(nodes, graph: Graph, labels: dict[int, list[str]], targets: int, mlps: str, routes: int = 3) -> dict:
    """Edges into the circuit's `targets` strongest nodes above the first layer, grouped by the target's class: the
    share of |weight| each kind carries, the share of each kind's |weight| from each class of source, the `routes`
    strongest (target position, kind, source position) with their share, and how much of the targets' attribution the
    edges carry (signed sums)."""
    chosen = [node for node in graph.nodes if node["layer"] > nodes.run.handle.layers[0]][:targets]
    if not chosen:
        return {}
    edges = attribute_edges(nodes, [node["id"] for node in chosen], mlps=mlps).records()
    attribution = {node["id"]: node["attribution"] for node in chosen}
    out = {}
    for c in CLASSES:
        mine = {node["id"] for node in chosen if head_class(node["head"], labels) == c}
        if not mine:
            continue
        into = [(s, t, k, w) for s, t, k, w in edges if t in mine]
        total = sum(abs(w) for *_, w in into) or 1.0
        kinds = {k: sum(abs(w) for _, _, kind, w in into if kind == k) for k in KINDS}
        sources = {k: {sc: sum(abs(w) for s, _, kind, w in into if kind == k and head_class(s.partition("@")[0], labels) == sc)
                          / (kinds[k] or 1.0) for sc in CLASSES} for k in KINDS}
        by_route: dict[str, float] = {}
        for s, t, k, w in into:
            route = f"@{t.partition('@')[2]} {k} from @{s.partition('@')[2]}"
            by_route[route] = by_route.get(route, 0.0) + abs(w) / total
        out[c] = {"targets": len(mine), "edges": len(into), "kinds": {k: v / total for k, v in kinds.items()},
                  "from": sources, "routes": dict(sorted(by_route.items(), key=lambda kv: -kv[1])[:routes]),
                  "carried": sum(w for *_, w in into) / (sum(attribution[t] for t in mine) or 1.0)}
    return out


@torch.no_grad()
def unspliced_metric(model, hops: int, n: int) -> float:
    """The metric of the original model on the prompts the circuit of `hops` hops is attributed on."""
    ids, _ = path_pairs(hops, n, "attribute")
    return float(METRIC(model(ids).logits, ids, None).mean())


def circuit_for(handle, hops: int, labels: dict[int, list[str]], original: float, args) -> dict:
    clean, corrupt = path_pairs(hops, args.prompts, "attribute")
    nodes = attribute(handle, clean, METRIC, corrupt)
    graph = prune(nodes, node_share=args.node_share, max_nodes=args.max_nodes, tokenizer=SymbolText())
    fresh, _ = path_pairs(hops, args.verify_prompts, "verify")
    prompts = list(fresh)
    stats = head_stats(handle, prompts)
    ranked = [abs(v) for _, v in nodes.top()]
    return {
        "path": PATHS[hops], "corrupt_position": ([QUERY] + PATHS[hops])[-2], "original_clean": original,
        "clean": nodes.clean_metric, "corrupt": nodes.baseline_metric, "attribution_total": nodes.total(),
        "attributed_nodes": len(ranked), "nodes": len(graph.nodes), "heads": graph.heads(),
        "node_share": sum(abs(node["attribution"]) for node in graph.nodes) / (sum(ranked) or 1.0),
        "by_layer": by_layer(graph, labels, handle.layers), "by_place": by_place(graph),
        "faithfulness": faithfulness(handle, prompts, graph, METRIC, stats=stats).to_dict(),
        "necessity": necessity(handle, prompts, graph, METRIC, stats=stats).to_dict(),
        "edges": {mlps: edge_shares(nodes, graph, labels, args.targets, mlps) for mlps in args.mlps},
        "top_nodes": [{k: node[k] for k in ("id", "token", "attribution")} | {"class": head_class(node["head"], labels)}
                      for node in graph.nodes[:12]],
    }


# ---- the report ------------------------------------------------------------------------------------------------------


def interval(estimate: dict) -> str:
    return f"{estimate['mean']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}]"


def markdown(report: dict) -> str:
    t, s = report["training"], report["sizes"]
    lines = [f"Number model (small preset, {t['steps']} steps): accuracy {t['accuracy']:.3f}; MHSA heads by layer: "
             + ", ".join(report["mhsa_labels"]) + ".", "",
             f"Every layer replaced by a Lorsa module (4 QK heads, {report['ov_heads']} OV heads, K 16, {s['lorsa_steps']} "
             f"Adam steps on {s['fit_prompts']} prompts; QK heads scored on {s['score_prompts']} prompts):", "",
             "| layer | explained variance (512 held-out prompts) | MHSA head | QK heads (s_pos, s_sym) |", "|---|---|---|---|"]
    for layer, row in report["layers"].items():
        qk = ", ".join(f"{label[:3]} ({p:.2f}, {q:.2f})" for label, p, q in zip(row["qk_labels"], row["qk_positional"], row["qk_symbolic"]))
        lines.append(f"| {layer} | {row['explained_variance']:.4f} | {report['mhsa_labels'][int(layer)]} | {qk} |")
    a = report["accuracy"]
    hops = sorted(a["original"]["per_hop"])
    lines += ["", f"Task accuracy on {a['prompts']} fresh prompts:", "",
              "| model | all | " + " | ".join(f"hops {h}" for h in hops) + " |", "|---|---|" + "---|" * len(hops)]
    for name in ("original", "spliced"):
        lines.append(f"| {name} | {a[name]['accuracy']:.3f} | " + " | ".join(f"{a[name]['per_hop'][h]:.3f}" for h in hops) + " |")
    cap = "" if s["max_nodes"] is None else f" (at most {s['max_nodes']})"
    lines += ["", f"Circuits: {s['prompts']} prompts per hop count on one fixed path, the last link corrupted; metric "
                  f"logit(answer) - logit(slot {CORRUPT_SLOT}); the fewest nodes carrying {s['node_share']} of the "
                  f"|attribution|{cap}; verified on "
                  f"{s['verify_prompts']} fresh prompts of the same path.", "",
              "| hops | path | metric original / spliced / corrupted | nodes (of those attributed) | heads | faithfulness "
              "(share kept) | normalised | necessity (lost) | matched control (lost) |", "|---|---|---|---|---|---|---|---|---|"]
    for h, c in report["circuits"].items():
        f, n = c["faithfulness"], c["necessity"]
        lines.append(f"| {h} | {' > '.join(map(str, [QUERY] + c['path']))} | {c['original_clean']:.2f} / {c['clean']:.2f} / "
                     f"{c['corrupt']:.2f} | {c['nodes']} of {c['attributed_nodes']} ({c['node_share']:.0%}) | {len(c['heads'])} | {interval(f['share'])} | "
                     f"{interval(f['normalised'])} | {interval(n['lost'])} | {interval(n['control_lost'])} |")
    layers = list(report["layers"])
    lines += ["", "Share of the circuit's |attribution| by layer and QK class (pos / sym / mixed), heads in brackets:", "",
              "| hops | " + " | ".join(f"L{layer}" for layer in layers) + " |", "|---|" + "---|" * len(layers)]
    for h, c in report["circuits"].items():
        cells = []
        for layer in layers:
            row = c["by_layer"][layer]
            cells.append(" / ".join(f"{row[k]['share']:.0%} ({row[k]['heads']})" for k in CLASSES))
        lines.append(f"| {h} | " + " | ".join(cells) + " |")
    lines += ["", "Where the circuit sits (layer @ position: share of its |attribution|, 5% and over):", ""]
    lines += [f"- hops {h}: " + ", ".join(f"{k} {v:.0%}" for k, v in c["by_place"].items()) for h, c in report["circuits"].items()]
    lines += ["", f"Edges into the circuit's top {s['targets']} nodes above layer 0, by the target's class: the share of "
                  "|weight| through query / key / value; carried: signed edge sum over the targets' attribution.", "",
              "| hops | MLPs | targets | edges | q | k | v | carried | key edges from pos / sym / mixed heads | strongest routes "
              "(target position, kind, source position) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for h, c in report["circuits"].items():
        for mlps, by_class in c["edges"].items():
            for cls, e in by_class.items():
                kinds = " | ".join(f"{e['kinds'][k]:.0%}" for k in KINDS)
                sources = " / ".join(f"{e['from']['k'][sc]:.0%}" for sc in CLASSES)
                routes = ", ".join(f"{r} {v:.0%}" for r, v in e["routes"].items())
                lines.append(f"| {h} | {mlps} | {e['targets']} {cls} | {e['edges']} | {kinds} | {e['carried']:.2f} | {sources} "
                             f"| {routes} |")
    seconds = report["seconds"]
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Folder for the run, the modules, report.json and report.md.")
    parser.add_argument("--steps", type=int, help="Override the small preset's training steps.")
    parser.add_argument("--lorsa-steps", type=int, default=1000, help="Adam steps per Lorsa module.")
    parser.add_argument("--fit-prompts", type=int, default=8192, help="Task prompts each module is fitted on.")
    parser.add_argument("--score-prompts", type=int, default=64, help="Prompts the QK heads are scored on.")
    parser.add_argument("--eval-prompts", type=int, default=512, help="Prompts for task accuracy, spliced and original.")
    parser.add_argument("--hops", default="1,2,3,4", help="Hop counts to find a circuit for, comma-separated.")
    parser.add_argument("--prompts", type=int, default=32, help="Prompt pairs attributed together, per hop count.")
    parser.add_argument("--verify-prompts", type=int, default=128, help="Fresh prompts for faithfulness and necessity.")
    parser.add_argument("--node-share", type=float, default=0.8, help="Share of the |attribution| the circuit's nodes carry.")
    parser.add_argument("--max-nodes", type=int, help="At most this many nodes in a circuit (default: no cap).")
    parser.add_argument("--targets", type=int, default=40, help="Circuit nodes whose incoming edges are attributed.")
    parser.add_argument("--mlps", nargs="+", choices=("direct", "linearised"), default=["direct", "linearised"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fast", action="store_true", help="Few steps and prompts throughout (for tests).")
    args = parser.parse_args()
    if args.fast:
        args.steps, args.lorsa_steps, args.fit_prompts, args.score_prompts, args.eval_prompts = 20, 20, 256, 4, 64
        args.hops, args.prompts, args.verify_prompts, args.max_nodes, args.targets = "1,2", 4, 6, 20, 4
    hop_counts = [int(h) for h in args.hops.split(",")]
    if not set(hop_counts) <= set(PATHS):
        parser.error(f"--hops takes hop counts among {sorted(PATHS)}.")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = {}

    t0 = time.time()
    config = training.preset("small", task="number", **({"steps": args.steps} if args.steps else {}))
    history = training.train(config, args.out / "run", progress=False)
    model, _ = training.load_checkpoint(args.out / "run" / f"step_{config.steps:06d}")
    seconds["training"] = time.time() - t0

    t0 = time.time()
    modules, fits = lorsa_modules(model, args, args.out, config.steps)
    seconds["fitting"] = time.time() - t0
    t0 = time.time()
    qk, mhsa = qk_classes(model, modules, args.score_prompts)
    group = modules[0].cfg.group_size
    labels = dict(zip(qk.layers, qk.expand(group).labels()))  # per OV head, its QK head's class
    qk_labels = qk.labels()
    seconds["scores"] = time.time() - t0

    t0 = time.time()
    eval_set = generate("number", args.eval_prompts, seed="circuits-eval")
    accuracy = {"prompts": args.eval_prompts, "original": training.evaluate(model, "number", eval_set)}
    original = {h: unspliced_metric(model, h, args.prompts) for h in hop_counts}
    handle = ls.splice(model, modules)
    accuracy["spliced"] = training.evaluate(model, "number", eval_set)
    seconds["accuracy"] = time.time() - t0

    t0 = time.time()
    circuits = {}
    for h in hop_counts:
        circuits[h] = circuit_for(handle, h, labels, original[h], args)
        print(f"{h} hops: {circuits[h]['nodes']} nodes, {len(circuits[h]['heads'])} heads, faithfulness "
              f"{interval(circuits[h]['faithfulness']['share'])}", flush=True)
    seconds["circuits"] = time.time() - t0

    report = {
        "training": {"steps": config.steps, "accuracy": history[-1]["accuracy"], "per_hop": history[-1]["per_hop"]},
        "mhsa_labels": [row[0] for row in mhsa.labels()],
        "ov_heads": modules[0].cfg.n_ov_heads,
        "sizes": {k: getattr(args, k) for k in ("lorsa_steps", "fit_prompts", "score_prompts", "prompts", "verify_prompts",
                                                "node_share", "max_nodes", "targets")},
        "layers": {layer: {"explained_variance": fits[layer]["explained_variance"], "reused": fits[layer]["reused"],
                           "qk_labels": qk_labels[row], "qk_positional": qk.positional[row].tolist(),
                           "qk_symbolic": qk.symbolic[row].tolist()} for row, layer in enumerate(qk.layers)},
        "accuracy": accuracy, "circuits": circuits, "seconds": seconds,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    (args.out / "report.md").write_text(markdown(json.loads(json.dumps(report))))  # the JSON's keys: hop counts as text
    print((args.out / "report.md").read_text())


if __name__ == "__main__":
    main()

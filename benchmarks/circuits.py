"""Cost of circuits through Lorsa heads on SmolLM2 with every attention layer spliced: one full attribution against
one forward and backward pass, and against patching head by head.

    python benchmarks/circuits.py [--modules smollm2-complete] [--length 20] [--targets 30] [--heads 64] [--repeats 3]

On one induction prompt (a start token and --length random words written twice; corrupted: the first copy replaced
by other words; metric `RepeatGain`), rows timed side by side in this run, variants interleaved, best of --repeats:
1. one forward and backward pass of the spliced model: the forward keeping every layer's head activations in the
   graph, the backward from the metric to them (the pass an attribution needs);
2. node attribution: every head of every layer at every position (`attribute`: that pass and the corrupted run);
3. full attribution: the nodes, and the Q/K/V edges into the --targets nodes of largest |attribution|
   (`attribute_edges`), MLPs `direct`, then `linearised`;
4. patching head by head: --heads of the heads that fire (in the clean or the corrupted run), each patched from the
   corrupted run at every position (`patch_heads`, 32 rows a pass), the time scaled to every head that fires;
5. patching node by node: 2 heads at every position (`sweep`, 32 rows a pass), scaled to every (head, position)
   that fires.
Each row's time is printed as a multiple of row 1, and patching's as a multiple of full attribution (direct).
"""

from __future__ import annotations

import argparse
import time

import torch

import lorsa_surgery as ls
from lorsa_surgery.analysis.circuits import attribute, attribute_edges, patch_heads
from lorsa_surgery.analysis.families import induction_pairs
from lorsa_surgery.interventions.patching import cache_run, sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", default="smollm2-complete",
                        help="A patched model: a folder, a Hub id or a shipped name.")
    parser.add_argument("--length", type=int, default=20, help="Words in each copy: the prompt is 2 x length + 1 tokens.")
    parser.add_argument("--targets", type=int, default=30, help="Downstream nodes whose edges are attributed.")
    parser.add_argument("--heads", type=int, default=64, help="Heads patched one by one (then scaled to every head that fires).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, handle = ls.load_patched(args.modules)
    clean, corrupt = induction_pairs(tokenizer, 1, args.length, seed=0)
    metric = ls.RepeatGain(args.length)
    nodes = attribute(handle, clean, metric, corrupt)
    run = nodes.run
    fires = {layer: (run.clean[layer] != 0) | (run.clean[layer] - run.delta[layer] != 0) for layer in handle.layers}
    firing_nodes = sum(int(f.sum()) for f in fires.values())
    firing_heads = [f"L{layer}.H{h}" for layer, f in fires.items() for h in f.any(1)[0].nonzero().flatten().tolist()]
    measured = firing_heads[:: max(1, len(firing_heads) // args.heads)][: args.heads]
    swept = ",".join(measured[:2])
    source = cache_run(handle, corrupt, swept)

    def forward_backward():
        cache = ls.run_with_cache(handle, clean, ["hook_acts"], grad=True)
        acts = [cache[f"L{layer}.hook_acts"] for layer in handle.layers]
        torch.autograd.grad(metric(cache.logits, clean, None).sum(), acts, allow_unused=True)

    def full(mlps: str):
        attribute_edges(attribute(handle, clean, metric, corrupt), top=args.targets, mlps=mlps)

    variants = {
        "forward + backward": forward_backward,
        "node attribution": lambda: attribute(handle, clean, metric, corrupt),
        f"nodes + edges into {args.targets} (direct)": lambda: full("direct"),
        f"nodes + edges into {args.targets} (linearised)": lambda: full("linearised"),
        "patching heads": lambda: patch_heads(nodes, metric, measured),
        "patching nodes": lambda: sweep(handle, clean, swept, metric, source=source, batch_size=32, progress=False),
    }
    best = {name: float("inf") for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    swept_nodes = 2 * clean.shape[1]
    best["patching heads"] *= len(firing_heads) / len(measured)
    best["patching nodes"] *= firing_nodes / swept_nodes
    unit, reference = best["forward + backward"], best[f"nodes + edges into {args.targets} (direct)"]
    print(f"{len(handle.layers)} layers spliced, prompt of {clean.shape[1]} tokens; {len(firing_heads)} heads and "
          f"{firing_nodes} (head, position) nodes fire; patching measured on {len(measured)} heads and {swept_nodes} "
          f"nodes, scaled to all; best of {args.repeats}")
    print(f"{'task':<40} {'s':>9} {'x fwd+bwd':>10} {'/ full attribution':>19}")
    for name, seconds in best.items():
        ratio = f"{seconds / reference:>19.1f}" if name.startswith("patching") else ""
        label = name + (f" (all {len(firing_heads)})" if name == "patching heads" else
                        f" (all {firing_nodes})" if name == "patching nodes" else "")
        print(f"{label:<40} {seconds:>9.2f} {seconds / unit:>10.1f} {ratio}")


if __name__ == "__main__":
    main()

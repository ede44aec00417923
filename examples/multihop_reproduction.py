"""Positional vs symbolic heads, end to end on a CPU (docs/multihop.md shows the method and the results).

1. Train a GPT-J on the letter task and one on the number task (the "small" preset by default: 6 layers).
2. Score every head at every checkpoint; classify the final heads; measure their RoPE frequency use.
3. Accuracy as extra window tokens lengthen the input; discrepancy of the pure heads against the bounds,
   and the bounds checked on heads built by hand.
4. Train a Lorsa module on one layer of each model and classify its QK heads against the MHSA head.
5. A real LLM (SmolLM2-135M, or any model spec with --llm, e.g. a Gemma 3 GGUF file): classify the heads of a
   few layers on the 1-hop probe; probe accuracy as the input grows.

    python examples/multihop_reproduction.py --out out/multihop          # about half an hour on 2 cores
    python examples/multihop_reproduction.py --fast --out out/fast       # a few steps of everything (for tests)
    python examples/multihop_reproduction.py --parts llm --llm gemma-3-270m-q4_k_m.gguf \
        --llm-layers 0,2,5,8,11,14,17 --out out/gemma                        # the probe and census on another LLM

Writes PNG plots and results.json into --out; rerunning resumes the training runs.
"""

import argparse
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lorsa_surgery.io import files

from lorsa_surgery.host import models

from lorsa_surgery.multihop import positional
from lorsa_surgery.multihop import tasks as multihop
from lorsa_surgery.multihop import train as training
from lorsa_surgery.multihop.fitting import fit_lorsa, task_prompts

EXTRAS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 833, 1007]
"""Extra window tokens per length test: inputs of 17 to 1024 tokens (850, where the paper reports the letter task)."""


def pure_from(records: list[dict]) -> list[int | None]:
    """Per layer, the first checkpoint step from which its head keeps one pure class (positional or symbolic)
    to the end of training, or None."""
    steps = []
    for layer in range(len(records[-1]["labels"])):
        classes = [r["labels"][layer][0] for r in records]
        final = classes[-1]
        first = None
        for record, label in zip(reversed(records), reversed(classes)):
            if label != final or final == "mixed":
                break
            first = record["step"]
        steps.append(first)
    return steps


def multihop_part(task: str, args, out: Path, results: dict) -> None:
    t0 = time.time()
    run = out / "runs" / task
    config = training.preset(args.preset, task=task, **({"steps": args.steps} if args.steps else {}))
    history = training.train(config, run)
    final = run / f"step_{config.steps:06d}"
    model, _ = training.load_checkpoint(final)
    records = training.checkpoint_scores(run, n_prompts=args.prompts)
    training.plot_scores_over_training(records, out / f"scores_over_training_{task}.png", title=f"{task} task")
    training.plot_pure_heads(records, history, out / f"pure_heads_{task}.png", title=f"{task} task")

    prompts = task_prompts(task, args.prompts, "scores")
    scores = positional.head_scores(model, prompts)
    labels = scores.labels()
    geometry = positional.head_geometry(model, prompts)
    positional.plot_frequency_use(geometry, out / f"frequency_use_{task}.png", labels, title=f"{task} task: RoPE frequency use")
    sweep = training.length_sweep(model, task, EXTRAS, n=args.length_prompts)

    # Each pure head's discrepancy on each prompt as the input grows, against the bound of its kind at its
    # dominant frequency at the training length (the plane it leans on; the argmax of nearly equal shares
    # would wander at other lengths): positional heads should stay under theirs, symbolic heads above.
    pure = [(row, h, label) for row, layer_labels in enumerate(labels) for h, label in enumerate(layer_labels)
            if label in ("positional", "symbolic")]
    alphabet = len(multihop.lookup_alphabet(task))
    theta = geometry.dominant_frequency()
    discrepancy = {}
    for extra in EXTRAS:
        n = training.TRAIN_LENGTH + extra
        g = positional.head_geometry(model, task_prompts(task, 32, "discrepancy", extra), progress=False)
        discrepancy[n] = {}
        for r, h, label in pure:
            gap = g.prompt_discrepancy[:, r, h].double()
            if label == "positional":
                bound = positional.positional_bound(n, theta[r, h], g.prompt_offset[:, r, h])
                wrong_side = gap > bound
            else:
                bound = positional.symbolic_bound(n, theta[r, h], alphabet).expand_as(gap)
                wrong_side = gap < bound
            discrepancy[n][f"L{scores.layers[r]}.A{h}"] = {
                "kind": label, "theta": theta[r, h].item(), "discrepancy": gap.mean().item(),
                "bound": bound.mean().item(), "wrong_side": int(wrong_side.sum()), "prompts": len(gap),
            }

    results[task] = {
        "config": asdict(config),
        "final": history[-1],
        "history": history,
        "pure_from": pure_from(records),
        "steps_to_95": next((h["step"] for h in history if h["accuracy"] >= 0.95), None),
        "scores": scores.to_dict(),
        "scores_over_training": records,
        "dominant_frequency": theta.tolist(),
        "frequency_use": geometry.frequency_use.tolist(),
        "length_sweep": sweep,
        "pure_heads": [f"L{scores.layers[r]}.A{h}" for r, h, _ in pure],
        "alphabet_size": alphabet,
        "discrepancy": discrepancy,
        "seconds": time.time() - t0,
    }


def discrepancy_plot(results: dict, out: Path) -> None:
    """Mean discrepancy of the pure heads of each kind in each model by input length, with the mean of the
    one-plane bounds at each head's dominant frequency and each prompt's attended offset (a reference: trained
    heads spread over many planes, outside the bounds' assumptions)."""
    curves, bounds = {}, {}
    for task in ("number", "letter"):
        by_length = results[task]["discrepancy"]
        for kind in ("positional", "symbolic"):
            lengths = [n for n in by_length if any(v["kind"] == kind for v in by_length[n].values())]
            if not lengths:
                continue
            heads = [[v for v in by_length[n].values() if v["kind"] == kind] for n in lengths]
            x = [int(n) for n in lengths]
            curves[f"{task} model: {kind} heads"] = (x, [sum(v["discrepancy"] for v in hs) / len(hs) for hs in heads])
            bound = [sum(v["bound"] for v in hs) / len(hs) for hs in heads]
            if any(bound):  # an all-zero lower bound guarantees nothing and has no place on a log axis
                bounds[f"{task} model: one-plane {kind} bound at their frequency"] = (x, bound)
    positional.plot_discrepancy(curves, bounds, out / "discrepancy.png", title="discrepancy of pure heads")


def constructions_part(out: Path, results: dict) -> None:
    """The bounds checked on heads built by hand (positional.single_frequency_model): the largest discrepancy
    of a positional head over 16 prompts against its upper bound, the smallest of a symbolic head (one match
    anywhere on 15 prompts, and the worst prompt: match first, rival next) against its lower bound, at each length."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for kind, theta, offset in (("positional", 0.3, 2), ("positional", 2 * math.pi * 0.618034, 2), ("symbolic", 2e-3, 0)):
        model = positional.single_frequency_model(kind, theta, offset=offset)
        for n in (9, 17, 33, 65, 129, 257):
            if kind == "symbolic":  # one match anywhere, and the worst prompt for the bound
                prompts = [positional.one_match_prompt(gen, n) for _ in range(15)]
                prompts.append(positional.one_match_prompt(gen, n, match_at=0, rival_at=1))
            else:
                prompts = [torch.randint(8, (n,), generator=gen) for _ in range(16)]
            gap = positional.head_geometry(model, prompts, progress=False).prompt_discrepancy[:, 0, 0]
            if kind == "positional":
                measured, bound = gap.max().item(), positional.positional_bound(n, theta, offset).item()
            else:
                measured, bound = gap.min().item(), positional.symbolic_bound(n, theta, 8).item()
            rows.append({"kind": kind, "theta": theta, "offset": offset, "tokens": n, "measured": measured, "bound": bound})
    results["constructions"] = rows
    files.write_json(out / "results.json", results)


def lorsa_part(args, out: Path, results: dict) -> None:
    t0 = time.time()
    results["lorsa"] = {}
    for task in ("number", "letter"):
        model, _ = training.load_checkpoint(out / "runs" / task / f"step_{results[task]['config']['steps']:06d}")
        labels = results[task]["scores"]["labels"]
        kind = "positional" if task == "number" else "symbolic"  # the kind each task needs first (docs/multihop.md)
        layer = next((i for i, row in enumerate(labels) if row[0] == kind), 1)
        lorsa, ev = fit_lorsa(model, task, layer, n_qk_heads=4, steps=args.lorsa_steps)
        lorsa.save_pretrained(out / "lorsa" / f"{task}-L{layer}", overwrite=True)
        prompts = task_prompts(task, args.prompts, "scores")
        qk = positional.head_scores(model, prompts, lorsa={layer: lorsa})
        results["lorsa"][task] = {
            "layer": layer, "explained_variance": ev, "mhsa_label": labels[layer][0],
            "mhsa_scores": [results[task]["scores"]["positional"][layer][0], results[task]["scores"]["symbolic"][layer][0]],
            "qk": qk.to_dict(), "group_size": lorsa.cfg.group_size,
        }
    results["lorsa"]["seconds"] = time.time() - t0


def llm_part(args, out: Path, results: dict) -> None:
    t0 = time.time()
    model, tok = models.load_model(args.llm)
    layers = [int(v) for v in args.llm_layers.split(",")]
    prompts = positional.probe_prompts("match", 8, n=args.llm_prompts, seed=1)
    ids = positional.probe_input_ids(tok, prompts)
    scores = positional.head_scores(model, ids, layers=layers, block=args.llm_block, skip=args.llm_skip)
    geometry = positional.head_geometry(model, ids, layers=layers)
    positional.plot_scores(scores, out / "llm_scores.png", title=f"{Path(args.llm).name}: match probe, 8 pairs")
    positional.plot_frequency_use(geometry, out / "llm_frequency_use.png", scores.labels())
    sweeps = {}
    for kind, sizes in (("match", [5, 8, 12, 16, 24, 32]), ("count", [5, 8, 12, 16, 24, 32, 48, 64])):
        sweeps[kind] = {}
        for n_items in sizes:
            probe = positional.probe_prompts(kind, n_items, n=args.llm_probe_prompts, seed=2)
            sweeps[kind][n_items] = {
                "accuracy": positional.probe_accuracy(model, tok, probe),
                "chance": 1 / n_items,
                "tokens": sum(len(t) for t in positional.probe_input_ids(tok, probe)) / len(probe),
            }
    training.plot_accuracy_vs_length(
        {f"{k} probe": v for k, v in sweeps.items()}, out / "llm_probe.png", train_length=None,
        xlabel="items in the prompt", title=f"{Path(args.llm).name}: 1-hop probe accuracy",
    )
    results["llm"] = {
        "model": args.llm, "layers": layers, "block": args.llm_block, "skip": args.llm_skip, "scores": scores.to_dict(),
        "dominant_frequency": geometry.dominant_frequency().tolist(), "probe": sweeps, "seconds": time.time() - t0,
    }


def report(results: dict, llm: str) -> None:
    for task in ("letter", "number"):
        if task not in results:
            continue
        r = results[task]
        print(f"{task}: accuracy {r['final']['accuracy']:.3f}; heads {r['scores']['labels']}")
        print("  accuracy by input length:", {n: round(v["accuracy"], 3) for n, v in r["length_sweep"].items()})
        print("  each layer's head pure from step:", r["pure_from"])
        for kind in ("positional", "symbolic"):
            wrong = sum(v["wrong_side"] for heads in r["discrepancy"].values() for v in heads.values() if v["kind"] == kind)
            total = sum(v["prompts"] for heads in r["discrepancy"].values() for v in heads.values() if v["kind"] == kind)
            if total:
                print(f"  {kind} heads on the wrong side of their bound: {wrong} of {total} (head, prompt, length)")
    for row in results.get("constructions", []):
        print(f"hand-built {row['kind']} head, theta {row['theta']:.3g}, {row['tokens']} tokens: "
              f"discrepancy {row['measured']:.4g}, bound {row['bound']:.4g}")
    for task, r in results.get("lorsa", {}).items():
        if task != "seconds":
            print(f"Lorsa on {task} L{r['layer']} (EV {r['explained_variance']:.3f}): MHSA {r['mhsa_label']}, QK heads {r['qk']['labels'][0]}")
    if "llm" in results:
        print(f"{llm} head classes:", results["llm"]["scores"]["labels"])
        print("  probe accuracy:", {k: {n: round(v['accuracy'], 2) for n, v in s.items()} for k, s in results["llm"]["probe"].items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/multihop"))
    parser.add_argument("--preset", choices=list(training.PRESETS), default="small")
    parser.add_argument("--steps", type=int, help="Override the preset's training steps.")
    parser.add_argument("--prompts", type=int, default=64, help="Prompts per head-score average.")
    parser.add_argument("--length-prompts", type=int, default=512, help="Prompts per input length.")
    parser.add_argument("--lorsa-steps", type=int, default=1000)
    parser.add_argument("--llm", default=models.DEFAULT_MODEL, help="Real LLM for the probe ('' to skip).")
    parser.add_argument("--llm-layers", default="0,3,6,9,12,15,20,25,29")
    parser.add_argument("--llm-block", type=int, default=2, help="Swap blocks of this many tokens in LLM prompts.")
    parser.add_argument("--llm-skip", type=int, default=1, help="Never swap the first tokens (the attention sink).")
    parser.add_argument("--llm-prompts", type=int, default=16)
    parser.add_argument("--llm-probe-prompts", type=int, default=64)
    parser.add_argument("--parts", default="tasks,lorsa,llm",
                        help="Which parts to run, comma-separated: tasks, lorsa (needs the tasks' runs and results in --out, "
                             "from this or an earlier run), llm.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fast", action="store_true", help="A few steps and prompts of everything (for tests).")
    args = parser.parse_args()
    if args.fast:
        args.steps, args.prompts, args.length_prompts, args.lorsa_steps = 20, 8, 16, 20
        args.llm_layers, args.llm_prompts, args.llm_probe_prompts = "0,3", 2, 4
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    parts = set(args.parts.split(","))
    if not parts <= {"tasks", "lorsa", "llm"}:
        parser.error("--parts takes tasks, lorsa and llm.")
    earlier = args.out / "results.json"
    results: dict = files.read_json(earlier) if earlier.is_file() and "tasks" not in parts else {}
    if "lorsa" in parts and "tasks" not in parts and not {"letter", "number"} <= set(results):
        parser.error(f"--parts lorsa needs the tasks part's results in {earlier}; run --parts tasks first.")
    if "tasks" in parts:
        for task in ("letter", "number"):
            multihop_part(task, args, args.out, results)
        training.plot_accuracy_vs_length(
            {f"{t} task": results[t]["length_sweep"] for t in ("letter", "number")}, args.out / "accuracy_vs_length.png"
        )
        discrepancy_plot(results, args.out)
        constructions_part(args.out, results)
    if "lorsa" in parts:
        lorsa_part(args, args.out, results)
        files.write_json(args.out / "results.json", results)
    if "llm" in parts and args.llm:
        llm_part(args, args.out, results)
        files.write_json(args.out / "results.json", results)
    report(results, args.llm)
    print(f"wrote plots and results.json to {args.out}")


if __name__ == "__main__":
    main()

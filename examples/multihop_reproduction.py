"""Positional vs symbolic heads, end to end on a CPU (docs/multihop.md shows the method and the results).

1. Train a GPT-J on the letter task and one on the number task (the "small" preset by default: 6 layers).
2. Score every head at every checkpoint; classify the final heads; measure their RoPE frequency use.
3. Accuracy as extra window tokens lengthen the input; discrepancy of the pure heads against the bounds.
4. Train a Lorsa module on one layer of each model and classify its QK heads against the MHSA head.
5. SmolLM2-135M: classify the heads of a few layers on the 1-hop probe; probe accuracy as the input grows.

    python examples/multihop_reproduction.py --out out/multihop          # about half an hour on 2 cores
    python examples/multihop_reproduction.py --fast --out out/fast       # a few steps of everything (for tests)

Writes PNG plots and results.json into --out; rerunning resumes the training runs.
"""

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lorsa_surgery import Lorsa, LorsaConfig, files, models, positional
from lorsa_surgery.arch import arch_for
from lorsa_surgery.tasks import multihop
from lorsa_surgery.tasks import train as training
from lorsa_surgery.training import capture

EXTRAS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]


def task_prompts(task: str, n: int, seed: str, extra: int = 0) -> torch.Tensor:
    ids, _ = multihop.TaskTokenizer(task).encode_examples(multihop.generate(task, n, seed=seed, extra=extra))
    return ids


def fit_lorsa(model, task: str, layer: int, n_qk_heads: int, steps: int, seed: int = 0) -> tuple[Lorsa, float]:
    """A top-K Lorsa module for `layer`, queries and keys initialised at random, fitted by squared error to
    the attention output on task prompts. (`lorsa_surgery.training.train` reads text through a tokenizer;
    the task models have none, so the few lines of the fit are here.) Returns it and its explained variance."""
    x, y = capture(model, layer, task_prompts(task, 8192, "lorsa"))
    held_x, held_y = capture(model, layer, task_prompts(task, 512, "lorsa-eval"))
    d = model.config.n_embd
    cfg = LorsaConfig(d_model=d, n_qk_heads=n_qk_heads, d_qk_head=d // model.config.n_head, n_ov_heads=2 * d,
                      top_k=16, host_layer=layer, **arch_for(model).rotary(model.config, layer))
    torch.manual_seed(seed)
    lorsa = Lorsa(cfg)
    with torch.no_grad():
        lorsa.b_D.copy_(y.mean((0, 1)))
    optimizer = torch.optim.Adam(lorsa.parameters(), lr=2e-3)
    for step in range(steps):
        batch = torch.randint(0, len(x), (64,))
        loss = (lorsa(x[batch]) - y[batch]).square().sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:  # linear decay over the last third
            group["lr"] = 2e-3 * min(1.0, 3 * (steps - step) / steps)
    with torch.no_grad():
        ev = 1 - (lorsa(held_x) - held_y).square().sum() / (held_y - held_y.mean((0, 1))).square().sum()
    return lorsa, ev.item()


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

    # Discrepancy of the pure heads as the input grows, against the bounds at their dominant frequency.
    kind = "positional" if task == "number" else "symbolic"
    pure = [(row, h) for row, layer_labels in enumerate(labels) for h, label in enumerate(layer_labels) if label == kind]
    discrepancy = {}
    for extra in EXTRAS[::2]:
        g = positional.head_geometry(model, task_prompts(task, 32, "discrepancy", extra), progress=False)
        discrepancy[training.TRAIN_LENGTH + extra] = [g.discrepancy[r, h].item() for r, h in pure]
    theta = [geometry.dominant_frequency()[r, h].item() for r, h in pure]

    results[task] = {
        "config": asdict(config),
        "final": history[-1],
        "steps_to_95": next((h["step"] for h in history if h["accuracy"] >= 0.95), None),
        "scores": scores.to_dict(),
        "scores_over_training": records,
        "dominant_frequency": geometry.dominant_frequency().tolist(),
        "frequency_use": geometry.frequency_use.tolist(),
        "length_sweep": sweep,
        "pure_heads": [f"L{scores.layers[r]}.A{h}" for r, h in pure],
        "pure_kind": kind,
        "pure_dominant_frequency": theta,
        "discrepancy": discrepancy,
        "seconds": time.time() - t0,
    }


def discrepancy_plot(results: dict, out: Path) -> None:
    """Mean discrepancy of the number model's positional heads and the letter model's symbolic heads by
    input length, with the bounds at the frequency those heads lean on: the fastest dominant frequency of
    the positional heads, the slowest of the symbolic heads."""
    curves, bounds = {}, {}
    for task, pick in (("number", max), ("letter", min)):
        r = results[task]
        if not r["pure_heads"]:
            continue
        lengths = sorted(r["discrepancy"], key=int)
        n = torch.tensor([int(v) for v in lengths], dtype=torch.float64)
        curves[f"{task} model: {r['pure_kind']} heads"] = (n.tolist(), [sum(r["discrepancy"][v]) / len(r["discrepancy"][v]) for v in lengths])
        theta = pick(r["pure_dominant_frequency"])
        bound = (positional.positional_bound(n, theta) if task == "number"
                 else positional.symbolic_bound(n, theta, len(multihop.PAIR_LETTERS)))
        bounds[f"{r['pure_kind']} bound, theta={theta:.2g}"] = (n.tolist(), bound.tolist())
    positional.plot_discrepancy(curves, bounds, out / "discrepancy.png", title="discrepancy of pure heads")


def lorsa_part(args, out: Path, results: dict) -> None:
    t0 = time.time()
    results["lorsa"] = {}
    for task in ("number", "letter"):
        model, _ = training.load_checkpoint(out / "runs" / task / f"step_{results[task]['config']['steps']:06d}")
        labels = results[task]["scores"]["labels"]
        kind = results[task]["pure_kind"]
        layer = next((i for i, row in enumerate(labels) if row[0] == kind), 1)
        lorsa, ev = fit_lorsa(model, task, layer, n_qk_heads=4, steps=args.lorsa_steps)
        lorsa.save_pretrained(out / "lorsa" / f"{task}-L{layer}")
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
    positional.plot_scores(scores, out / "llm_scores.png", title=f"{args.llm}: match probe, 8 pairs")
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
        xlabel="items in the prompt", title=f"{args.llm}: 1-hop probe accuracy",
    )
    results["llm"] = {
        "model": args.llm, "layers": layers, "block": args.llm_block, "skip": args.llm_skip, "scores": scores.to_dict(),
        "dominant_frequency": geometry.dominant_frequency().tolist(), "probe": sweeps, "seconds": time.time() - t0,
    }


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
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fast", action="store_true", help="A few steps and prompts of everything (for tests).")
    args = parser.parse_args()
    if args.fast:
        args.steps, args.prompts, args.length_prompts, args.lorsa_steps = 20, 8, 16, 20
        args.llm_layers, args.llm_prompts, args.llm_probe_prompts = "0,3", 2, 4
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    results: dict = {}
    for task in ("letter", "number"):
        multihop_part(task, args, args.out, results)
    training.plot_accuracy_vs_length(
        {f"{t} task": results[t]["length_sweep"] for t in ("letter", "number")}, args.out / "accuracy_vs_length.png"
    )
    discrepancy_plot(results, args.out)
    files.write_json(args.out / "results.json", results)

    lorsa_part(args, args.out, results)
    files.write_json(args.out / "results.json", results)
    if args.llm:
        llm_part(args, args.out, results)
    files.write_json(args.out / "results.json", results)
    for task in ("letter", "number"):
        r = results[task]
        print(f"{task}: accuracy {r['final']['accuracy']:.3f}; heads {r['scores']['labels']}")
        print("  accuracy by input length:", {n: round(v["accuracy"], 3) for n, v in r["length_sweep"].items()})
    for task, r in results["lorsa"].items():
        if task != "seconds":
            print(f"Lorsa on {task} L{r['layer']} (EV {r['explained_variance']:.3f}): MHSA {r['mhsa_label']}, QK heads {r['qk']['labels'][0]}")
    if "llm" in results:
        print(f"{args.llm} head classes:", results["llm"]["scores"]["labels"])
        print("  probe accuracy:", {k: {n: round(v['accuracy'], 2) for n, v in s.items()} for k, s in results["llm"]["probe"].items()})
    print(f"wrote plots and results.json to {args.out}")


if __name__ == "__main__":
    main()

"""Every attention layer of SmolLM2 replaced by Lorsa: trained from one host pass, healed, measured.

Stages, each kept in --out and skipped when its result is there (training resumes from its last checkpoint):

1. text/: the built-in Python documentation split by document, nine in ten for training, one in ten held out.
2. train/: one Lorsa module per attention layer, all from one host pass (`--layers all`), on the training
   documents and text sampled from SmolLM2 itself (576 heads a layer: the 30 modules fit in 80 MB at 16 bits;
   K 64); `--inputs replaced` trains each layer on what the replaced layers below it hand on.
3. healed/: the complete replacement healed end to end (every module and rank-8 LoRA adapters, against the KL
   to the original), saved as a patched model.
4. report.json, report.md, replacement.png: LM loss and KL on the held-out documents and on the built-in prose of
   other domains, for the first k and the k cheapest layers replaced (k = 1, 2, 4, 8, 16, 30; cheapest: the
   layers whose module alone raises the held-out loss least), against the floor of those layers mean-ablated
   (loss recovered = (floor - replaced) / (floor - original)); all layers healed; L0 and dead heads per layer;
   greedy generation speed, all layers replaced against the original, in one run.
5. with --ship DIR: the healed replacement at 16 bits in DIR, its card carrying the table of step 4.

    python examples/complete_replacement.py --out runs/complete                      # the full run (see --help)
    python examples/complete_replacement.py --out runs/complete-fast --fast          # two layers, a few steps
    python examples/complete_replacement.py --out runs/complete --ship lorsa_surgery/default_modules/smollm2-complete
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import lorsa_surgery as ls
from lorsa_surgery.host import corpus
from lorsa_surgery.host.metrics import attention_means, compare, loss_recovered, mean_ablated
from lorsa_surgery.publishing.patched import module_folders
from lorsa_surgery.training.healing import evaluate
from lorsa_surgery.training.trainer import SAMPLED_CORPUS, token_sequences

KS = (1, 2, 4, 8, 16, 30)


def split_documentation(folder: Path) -> tuple[Path, Path]:
    """The Python documentation as two .jsonl files: every tenth document held out, the rest for training."""
    train, held_out = folder / "train.jsonl", folder / "held_out.jsonl"
    if not held_out.exists():
        folder.mkdir(parents=True, exist_ok=True)
        docs = corpus.python_documentation()
        for path, part in ((train, [d for i, d in enumerate(docs) if i % 10]), (held_out, docs[::10])):
            path.write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    return train, held_out


def train_all(args, text: Path, model, tokenizer) -> dict[int, ls.Lorsa]:
    out = args.out / "train"
    layers = "0-1" if args.fast else "all"
    config = ls.TrainConfig(
        model="smollm2", layers=layers, out=str(out), n_heads=args.heads, k=args.k, tokens=args.tokens,
        texts=(str(text),), sample_tokens=args.sample_tokens, inputs=args.inputs, eval_tokens=args.eval_tokens,
        lm_loss_tokens=args.eval_tokens, checkpoint_every=args.checkpoint_every, resume=True,
    )
    n_layers = model.config.num_hidden_layers
    done = [out / f"L{layer}" for layer in config.layer_list(n_layers)]
    if all((folder / "lorsa_config.json").exists() for folder in done):
        return {layer: ls.Lorsa.from_pretrained(out / f"L{layer}") for layer in config.layer_list(n_layers)}
    return ls.train(config, model=model, tokenizer=tokenizer)


def heal_all(args, modules: dict[int, ls.Lorsa], text: Path, model, tokenizer) -> dict:
    folder = args.out / "healed"
    if (folder / "lorsa_surgery.json").exists():
        return json.loads((folder / "lorsa_surgery.json").read_text())["metrics"]["healing"]
    handle = ls.splice(model, copy.deepcopy(modules))  # healing trains the modules; the unhealed ones are measured too
    sampled = args.out / "train" / SAMPLED_CORPUS
    config = ls.HealConfig(tokens=args.heal_tokens, texts=(str(text), str(sampled)), eval_tokens=args.eval_tokens,
                           context=args.context)
    report = ls.heal(handle, tokenizer, config)
    # Kept at 16 bits, as shipped; what the rounding costs is measured on the prose before and after.
    ids, mask = token_sequences(corpus.prose(), tokenizer, args.context)
    ids, mask = ids[: args.eval_sequences], mask[: args.eval_sequences]
    full = evaluate(handle, ids, mask)
    for lorsa in handle.modules().values():
        lorsa.half()
    report["storage"] = {"float32": full, "float16": evaluate(handle, ids, mask)}
    ls.save_patched(handle, folder, metrics={"healing": report})
    handle.unsplice()
    return report


def activity(handle: ls.Splice, ids: torch.Tensor, mask: torch.Tensor) -> dict[int, dict[str, float]]:
    """Per spliced layer: mean heads firing per real token (L0) and the share of heads that never fired."""
    fired: dict[int, torch.Tensor] = {}
    l0: dict[int, float] = {}
    tokens = 0
    for i in range(0, len(ids), 4):
        cache = ls.run_with_cache(handle, ids[i : i + 4], ["hook_acts"], attention_mask=mask[i : i + 4])
        keep = mask[i : i + 4].bool()
        tokens += int(keep.sum())
        for layer in handle.layers:
            on = cache[f"L{layer}.hook_acts"][keep] != 0  # [tokens, heads]
            fired[layer] = fired.get(layer, torch.zeros(on.shape[-1], dtype=torch.bool)) | on.any(0)
            l0[layer] = l0.get(layer, 0.0) + float(on.sum())
    return {layer: {"l0": l0[layer] / tokens, "dead": float((~fired[layer]).float().mean())} for layer in handle.layers}


def generation_ratio(model, tokenizer, modules: dict[int, ls.Lorsa], rounds: int, new_tokens: int) -> dict:
    """Greedy generation time, all layers replaced / the original, rounds alternating; medians."""
    ids = tokenizer("The history of the lighthouse begins", return_tensors="pt").input_ids
    times: dict[str, list[float]] = {"original": [], "replaced": []}
    for _ in range(rounds):
        for name in ("original", "replaced"):
            handle = ls.splice(model, modules) if name == "replaced" else None
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tokenizer.eos_token_id)
            times[name].append(time.perf_counter() - start)
            if handle is not None:
                handle.unsplice()
    original, replaced = statistics.median(times["original"]), statistics.median(times["replaced"])
    return {"original_s": original, "replaced_s": replaced, "ratio": replaced / original, "new_tokens": new_tokens}


@torch.no_grad()
def measure(args, modules: dict[int, ls.Lorsa], held_out: Path, model, tokenizer) -> dict:
    texts = {"held_out": token_sequences(corpus.load_texts([held_out]), tokenizer, args.context),
             "other_domains": token_sequences(corpus.prose(), tokenizer, args.context)}
    texts = {name: (ids[: args.eval_sequences], mask[: args.eval_sequences]) for name, (ids, mask) in texts.items()}
    layers = sorted(modules)
    # The floor's means come from training text, not from the text measured on.
    train_ids, train_mask = token_sequences(corpus.load_texts([args.out / "text" / "train.jsonl"]), tokenizer, args.context)
    means = attention_means(model, layers, train_ids[: args.eval_sequences], train_mask[: args.eval_sequences])
    alone = {layer: modules[layer].training_info["lm_loss_spliced"] - modules[layer].training_info["lm_loss_original"]
             for layer in layers}
    cheapest = sorted(layers, key=alone.get)
    ks = sorted({k for k in KS if k < len(layers)} | {len(layers)})  # always ending with every layer
    rows = []
    for order, chosen in (("first", layers), ("cheapest", cheapest)):
        for k in ks:
            subset = sorted(chosen[:k])
            row = {"order": order, "k": k, "layers": subset}
            for name, (ids, mask) in texts.items():
                spliced = compare(model, ids, mask, candidate=lambda: ls.splice(model, {l: modules[l] for l in subset}))
                floor = compare(model, ids, mask, candidate=lambda: mean_ablated(model, {l: means[l] for l in subset}))
                row[name] = {"original": spliced["lm_loss_original"], "replaced": spliced["lm_loss_spliced"],
                             "kl": spliced["kl"], "floor": floor["lm_loss_spliced"], "floor_kl": floor["kl"],
                             "recovered": recovered(spliced["lm_loss_original"], spliced["lm_loss_spliced"],
                                                    floor["lm_loss_spliced"]),
                             "tokens": spliced["tokens"]}
            rows.append(row)
            print(f"{order} {k}: " + "; ".join(f"{n} loss {row[n]['replaced']:.4f} (original {row[n]['original']:.4f}, "
                                               f"floor {row[n]['floor']:.4f}), recovered {share(row[n]['recovered'])}"
                                               for n in texts), flush=True)
    every = rows[len(ks) - 1]  # "first", every layer
    healed_model, _, healed = ls.load_patched(args.out / "healed")
    healed_rows = {}
    for name, (ids, mask) in texts.items():
        after = evaluate(healed, ids, mask)
        floor = every[name]["floor"]
        healed_rows[name] = {**after, "floor": floor,
                             "recovered": recovered(after["lm_loss_original"], after["lm_loss_spliced"], floor)}
    # What `--lorsa all=default` splices: the healed modules without the adapter they were healed with.
    healed_modules = {layer: ls.Lorsa.from_pretrained(path) for layer, path in module_folders(args.out / "healed").items()}
    for name, (ids, mask) in texts.items():
        after = compare(model, ids, mask, candidate=lambda: ls.splice(model, healed_modules))
        floor = every[name]["floor"]
        healed_rows[f"{name}_modules_alone"] = {
            **after, "recovered": recovered(after["lm_loss_original"], after["lm_loss_spliced"], floor)}
    ids, mask = texts["held_out"]
    with ls.splice(model, modules) as handle:
        heads = activity(handle, ids, mask)
    return {"layers": layers, "alone": alone, "rows": rows, "healed": healed_rows, "heads": heads,
            "sequences": args.eval_sequences, "context": args.context,
            "k": {layer: modules[layer].cfg.top_k for layer in layers},
            "generation": generation_ratio(model, tokenizer, modules, rounds=args.rounds, new_tokens=args.new_tokens)}


TEXTS = {"held_out": "held-out documentation", "other_domains": "prose of other domains"}


def ship(report: dict, healed: Path, folder: Path) -> None:
    """The healed replacement where the toolkit ships it (`ls.load_patched("smollm2-complete")`), its card carrying
    the table of layers replaced together."""
    _, _, handle = ls.load_patched(healed)
    for lorsa in handle.modules().values():
        lorsa.half()  # splicing gave them the host's float32
    rows = [{"label": f"first {row['k']}", "text": text, **{key: row[name][key] for key in
                                                            ("original", "replaced", "floor", "kl", "recovered")}}
            for row in report["rows"] if row["order"] == "first" for name, text in TEXTS.items()]
    for name, text in TEXTS.items():
        h = report["healed"][name]
        rows.append({"label": "all, healed", "text": text, "original": h["lm_loss_original"],
                     "replaced": h["lm_loss_spliced"], "floor": h["floor"], "kl": h["kl"], "recovered": h["recovered"]})
    note = (f"{report['sequences']} sequences of up to {report['context']} tokens of each text; the floor's means "
            "come from the training text. Made by examples/complete_replacement.py.")
    metrics = json.loads((healed / "lorsa_surgery.json").read_text())["metrics"]
    ls.save_patched(handle, folder, metrics={**metrics, "replacement": {"rows": rows, "note": note}}, overwrite=True)


def share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def recovered(original: float, replaced: float, floor: float) -> float | None:
    """Loss recovered, or None where mean-ablating the layers costs nothing (the share would mean nothing)."""
    return loss_recovered(original, replaced, floor) if floor > original else None


def write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = ["| replaced | layers | held-out loss (original) | floor | KL | recovered | other-domain loss (original) "
             "| floor | KL | recovered |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        h, o = row["held_out"], row["other_domains"]
        lines.append(f"| {row['order']} {row['k']} | {','.join(map(str, row['layers']))} | {h['replaced']:.3f} "
                     f"({h['original']:.3f}) | {h['floor']:.3f} | {h['kl']:.3f} | {share(h['recovered'])} | "
                     f"{o['replaced']:.3f} ({o['original']:.3f}) | {o['floor']:.3f} | {o['kl']:.3f} | {share(o['recovered'])} |")
    for label, suffix in (("all, healed", ""), ("all, healed modules without the adapter", "_modules_alone")):
        h, o = report["healed"]["held_out" + suffix], report["healed"]["other_domains" + suffix]
        lines.append(f"| {label} | all | {h['lm_loss_spliced']:.3f} ({h['lm_loss_original']:.3f}) | | {h['kl']:.3f} | "
                     f"{share(h['recovered'])} | {o['lm_loss_spliced']:.3f} ({o['lm_loss_original']:.3f}) | | "
                     f"{o['kl']:.3f} | {share(o['recovered'])} |")
    lines += ["", "| layer | K | L0 (heads firing per token) | dead heads | loss change alone |", "|---|---|---|---|---|"]
    for layer in report["layers"]:
        heads = report["heads"][layer]
        lines.append(f"| {layer} | {report['k'][layer]} | {heads['l0']:.1f} | {heads['dead']:.1%} | "
                     f"{report['alone'][layer]:+.4f} |")
    kept = report["storage"]
    lines += ["", f"Healed modules rounded to 16 bits, on the prose: KL {kept['float32']['kl']:.5f} -> "
                  f"{kept['float16']['kl']:.5f}, LM loss {kept['float32']['lm_loss_spliced']:.4f} -> "
                  f"{kept['float16']['lm_loss_spliced']:.4f}."]
    g = report["generation"]
    lines += ["", f"Greedy generation of {g['new_tokens']} tokens: {g['replaced_s']:.2f} s replaced, "
                  f"{g['original_s']:.2f} s original, ratio {g['ratio']:.2f}x."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot(report, out / "replacement.png")


def plot(report: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, name, title in zip(fig.subplots(1, 2), ("held_out", "other_domains"), ("held-out documentation", "prose of other domains")):
        for order, style in (("first", "o-"), ("cheapest", "s--")):
            rows = [r for r in report["rows"] if r["order"] == order]
            ax.plot([r["k"] for r in rows], [r[name]["recovered"] for r in rows], style, label=f"{order} k layers")
        if report["healed"][name]["recovered"] is not None:
            ax.plot([len(report["layers"])], [report["healed"][name]["recovered"]], "r*", markersize=12, label="all, healed")
        ax.axhline(0.9, ls=":", color="gray")
        ax.set(xscale="log", xlabel="attention layers replaced", ylabel="loss recovered", title=title, ylim=(None, 1.02))
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Folder for every stage (kept; reruns skip what is done).")
    parser.add_argument("--heads", type=int, default=576, help="OV heads per layer (a multiple of the 9 QK heads).")
    parser.add_argument("--k", type=int, default=64, help="Heads firing per token, per layer (docs/training.md: K sweep).")
    parser.add_argument("--tokens", type=int, default=500_000, help="Training tokens per layer (all layers see them in one pass).")
    parser.add_argument("--sample-tokens", type=int, default=150_000, help="Tokens of text sampled from SmolLM2 to train on too.")
    parser.add_argument("--inputs", choices=("original", "replaced"), default="original",
                        help="replaced matched original at 82k tokens per layer (docs/training.md) and costs 1.2x the steps.")
    parser.add_argument("--heal-tokens", type=int, default=80_000)
    parser.add_argument("--context", type=int, default=128, help="Tokens per sequence for healing and measuring.")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--eval-sequences", type=int, default=20, help="Sequences of each text measured on.")
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3, help="Generation timing rounds.")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ship", type=Path, help="Also write the healed replacement here at 16 bits, with its card "
                        "(the toolkit's copy: lorsa_surgery/default_modules/smollm2-complete).")
    parser.add_argument("--fast", action="store_true", help="Layers 0 and 1, a few steps (for tests).")
    args = parser.parse_args()
    if args.fast:
        args.heads, args.k, args.tokens, args.sample_tokens, args.heal_tokens = 72, 8, 4096, 512, 1024
        args.eval_tokens, args.eval_sequences, args.checkpoint_every, args.rounds, args.new_tokens = 2048, 4, 0, 1, 8
    torch.set_num_threads(args.threads)
    model, tokenizer = ls.load_model("smollm2")
    train_text, held_out = split_documentation(args.out / "text")
    modules = train_all(args, train_text, model, tokenizer)
    healing = heal_all(args, modules, train_text, model, tokenizer)
    if not (args.out / "report.json").exists():
        report = {**measure(args, modules, held_out, model, tokenizer), "storage": healing["storage"]}
        write_report(report, args.out)
    report = json.loads((args.out / "report.json").read_text())
    print((args.out / "report.md").read_text())
    if args.ship:
        ship(report, args.out / "healed", args.ship)


if __name__ == "__main__":
    main()

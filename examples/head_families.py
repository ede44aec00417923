"""The figures of docs/heads.md: head families in the three shipped SmolLM2 modules and in MHSA layers, their causal
effects against matched random controls, and where the Lorsa heads' OV circuits come from.

    python examples/head_families.py                 # shipped modules 3, 18, 23; MHSA layers 3, 17, 18, 23 (about 40 min)
    python examples/head_families.py --fast          # fewer prompts, layer 3 only (for tests)

Prints Markdown tables; with --out, also writes every score as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

import lorsa_surgery as ls
from lorsa_surgery.analysis.attribution import token_text, unembedding
from lorsa_surgery.analysis.causal import BEHAVIOURS, WORDS, behaviour, behaviour_probe, causal_check
from lorsa_surgery.analysis.families import FAMILIES, catalog_entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="Layer 3 only, few prompts (for tests).")
    parser.add_argument("--prompts", type=int, default=16, help="Prompts per detector probe.")
    parser.add_argument("--causal-prompts", type=int, default=64, help="Prompts per causal check.")
    parser.add_argument("--out", type=Path, default=None, help="Write all scores here as JSON.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, n_causal = (4, 8) if args.fast else (args.prompts, args.causal_prompts)
    shipped = [3] if args.fast else [3, 18, 23]
    mhsa = [3] if args.fast else [3, 17, 18, 23]

    model, tokenizer = ls.load_model("smollm2")
    logits = unembedding(model)
    record: dict[str, dict] = {}
    print("| layer | heads | " + " | ".join(FAMILIES) + " |")
    print("|---|---|" + "---|" * len(FAMILIES))
    found, modules = {}, {layer: ls.module_for(model, layer, "default") for layer in shipped}
    for layer, lorsa in modules.items():
        found[layer] = ls.detect(model, tokenizer, layer, lorsa, n_prompts=n)
        print(f"| L{layer} Lorsa | {lorsa.cfg.n_ov_heads} | " + " | ".join(str(len(fs.members())) for fs in found[layer].values()) + " |")
        record[f"L{layer}"] = {name: fs.scores.tolist() for name, fs in found[layer].items()}
    for layer in mhsa:
        result = ls.detect(model, tokenizer, layer, None, n_prompts=n)
        best = [f"{len(fs.members())} (A{int(fs.scores.argmax())} {float(fs.scores.max()):.2f})" for fs in result.values()]
        print(f"| L{layer} MHSA | {len(next(iter(result.values())).scores)} | " + " | ".join(best) + " |")
        record[f"L{layer}-mhsa"] = {name: fs.scores.tolist() for name, fs in result.items()}

    for layer, lorsa in modules.items():
        effects = logits(lorsa.W_O)
        print(f"\nLayer {layer}, top heads per family (score; probe positions where it fired; tokens its output promotes most)")
        print("| family | head | score | fired | promotes |")
        print("|---|---|---|---|---|")
        for name, fs in found[layer].items():
            for h in fs.scores.argsort(descending=True)[:3].tolist():
                if fs.scores[h] <= 0:
                    continue
                promotes = ", ".join(repr(token_text(tokenizer, int(t))) for t in effects[h].topk(3).indices)
                print(f"| {name} | L{layer}.H{h} | {float(fs.scores[h]):.2f} | {int(fs.counted[h])} | {promotes} |")
        top = ls.provenance(model, layer, lorsa)["output"].max(1).values
        print(f"\nLayer {layer} provenance: median main-MHSA-head share {float(top.median()):.2f}; "
              f"{float((top < 0.9).float().mean()):.1%} of heads under 0.9, {float((top < 0.5).float().mean()):.1%} under 0.5")

        handle = ls.splice(model, {layer: lorsa})
        print(f"\nLayer {layer}, causal checks ({n_causal} fresh prompts; mean [95% bootstrap CI])")
        print("| label | heads | behaviour | clean | family ablated | matched control ablated | patched back | effect | control effect |")
        print("|---|---|---|---|---|---|---|---|---|")
        labels = catalog_entries(found[layer])  # what `heads detect --write-catalog` writes
        for family in BEHAVIOURS:
            groups = {family: found[layer][family].members()}
            if FAMILIES[family].copies:  # and the heads that read the family's target without promoting it directly
                groups[f"{family}_attention"] = sorted(h for h, e in labels.items() if e["label"] == f"{family}_attention")
            for label, heads in groups.items():
                if not heads:
                    print(f"| {label} | 0 | {BEHAVIOURS[family]} | no heads found | | | | | |")
                    continue
                c = causal_check(handle, tokenizer, layer, family, heads, n_prompts=n_causal)
                print(f"| {label} | {len(heads)} | {c.behaviour} | {c.clean} | {c.ablated} | {c.control_ablated} "
                      f"| {c.restored} | {c.effect} | {c.control_effect} |")
                record[f"L{layer}-causal-{label}"] = {"heads": c.heads, "control": c.control, "clean": c.clean.mean,
                                                      "ablated": c.ablated.mean, "control_ablated": c.control_ablated.mean,
                                                      "restored": c.restored.mean}
        if family_heads := [h for h in found[layer]["induction"].scores.argsort(descending=True).tolist()
                            if found[layer]["induction"].scores[h] > 0]:
            print(f"\nLayer {layer}, induction ablation by detector threshold (the family's threshold is "
                  f"{FAMILIES['induction'].threshold}; all heads = the whole layer's attention)")
            print("| heads ablated | count | words | clean | family ablated | matched control ablated | effect | control effect |")
            print("|---|---|---|---|---|---|---|---|")
            scores = found[layer]["induction"].scores
            for t in (FAMILIES["induction"].threshold, 0.1, 0.05):
                heads = [h for h in family_heads if scores[h] >= t]
                for words in WORDS:
                    if len(heads) < 8:  # too few heads promote the 20 distinct words a family-word prompt needs
                        print(f"| score >= {t} | {len(heads)} | {words} | | | | | |")
                        continue
                    c = causal_check(handle, tokenizer, layer, "induction", heads, n_prompts=n_causal, words=words)
                    print(f"| score >= {t} | {len(heads)} | {words} | {c.clean} | {c.ablated} | {c.control_ablated} "
                          f"| {c.effect} | {c.control_effect} |")
            probe = behaviour_probe("induction", tokenizer, n_causal, 1000)  # the prompts causal_check uses (seed 0)
            clean = behaviour(handle, "induction", probe).mean()
            with ls.InterventionSet([ls.Ablate(f"L{layer}.H0-{lorsa.cfg.n_ov_heads - 1}")]).applied(handle):
                whole = behaviour(handle, "induction", probe).mean()
            print(f"| all heads | {lorsa.cfg.n_ov_heads} | random | {float(clean):.3f} | {float(whole):.3f} | | | |")
        ls.unsplice(model)
        if family_heads:
            induction_without_other_layers(model, tokenizer, layer, lorsa, found[layer]["induction"].scores, family_heads,
                                           n, n_causal, record)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "head_families.json").write_text(json.dumps(record))


OTHER_INDUCTION = 0.1
"""Induction score from which another layer's MHSA head counts as carrying induction (half the family threshold)."""


def induction_without_other_layers(model, tokenizer, layer, lorsa, scores, ranked, n, n_causal, record) -> None:
    """The induction check again with the MHSA heads of the six layers before `layer` that score OTHER_INDUCTION or
    more as induction heads ablated in every run (through exact copies spliced there), so the family cannot lean on
    them."""
    others = list(range(max(0, layer - 6), layer))
    copies = {other: ls.exact_copy(model, other) for other in others}
    also, rest = [], []
    for other, copy in copies.items():
        best = ls.detect(model, tokenizer, other, None, families=["induction"], n_prompts=n)["induction"].scores
        width = copy.cfg.n_ov_heads // copy.cfg.n_qk_heads  # rank-1 heads per MHSA head in an exact copy
        for a in range(len(best)):
            ref = (f"L{other}.A{a} {float(best[a]):.2f}", f"L{other}.H{a * width}-{(a + 1) * width - 1}")
            (also if best[a] >= OTHER_INDUCTION else rest).append(ref)
    if not also:
        print(f"\nLayer {layer}: no MHSA head of layers {others[0]}-{others[-1]} scores {OTHER_INDUCTION} for induction")
        return
    with ls.splice(model, {layer: lorsa, **copies}) as handle:
        print(f"\nLayer {layer}, induction ablation with {len(also)} MHSA heads of layers {others[0]}-{others[-1]} ablated in "
              f"every run ({', '.join(name for name, _ in also)})")
        probe = behaviour_probe("induction", tokenizer, n_causal, 1000)  # the prompts causal_check uses (seed 0)
        draws = [random.Random(i).sample(rest, len(also)) for i in range(3)]  # as many other heads of those layers
        for refs in [[], also, *draws]:
            with ls.InterventionSet([ls.Ablate([r for _, r in refs])] if refs else []).applied(handle):
                accuracy = behaviour(handle, "induction", probe)
            print(f"- repeated-token accuracy {accuracy.mean():.3f} with "
                  + (", ".join(name.split()[0] for name, _ in refs) if refs else "nothing") + " ablated")
        print("\n| heads ablated | count | clean | family ablated | matched control ablated | patched back | effect | control effect |")
        print("|---|---|---|---|---|---|---|---|")
        for t in (FAMILIES["induction"].threshold, 0.05):
            heads = [h for h in ranked if scores[h] >= t]
            if not heads:
                continue
            c = causal_check(handle, tokenizer, layer, "induction", heads, n_prompts=n_causal,
                             also_ablate=[ref for _, ref in also])
            print(f"| score >= {t} | {len(heads)} | {c.clean} | {c.ablated} | {c.control_ablated} | {c.restored} "
                  f"| {c.effect} | {c.control_effect} |")
            record[f"L{layer}-causal-induction-without-others-{t}"] = {"also_ablated": c.also_ablated, "clean": c.clean.mean,
                                                                      "ablated": c.ablated.mean,
                                                                      "control_ablated": c.control_ablated.mean}


if __name__ == "__main__":
    main()

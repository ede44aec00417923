"""Which training settings give the best Lorsa module at a fixed budget: the measurements behind TrainConfig's
defaults (docs/training.md, "Choosing the defaults").

Every setting trains SmolLM2-135M-Instruct layer 3 on the built-in Python documentation with the same tokens,
seed and held-out split, then reports held-out explained variance on that text and on the built-in English
prose sample (another domain), each beside the best linear map fitted on the training tokens, the LM loss with
the module spliced in, and the dead heads. Activations are cached under --out, so only the first run pays for
the host model.

    nice python examples/training_sweep.py --out runs/sweep                        # expansion 4, K 32, 100k tokens
    nice python examples/training_sweep.py --out runs/sweep-paper --expansion 8 --k 64 --tokens 400000 \
        --settings old,new
    python examples/training_sweep.py --out runs/sweep-fast --fast                 # two tiny runs (for tests)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lorsa_surgery import load_model
from lorsa_surgery.training.trainer import TrainConfig, train

# name -> the TrainConfig fields that differ from the defaults
SETTINGS = {
    "old": {"init": "qk", "lr": 2e-4},  # the defaults before this sweep
    "qk lr 1e-3": {"init": "qk", "lr": 1e-3},
    "random lr 1e-3": {"init": "random", "lr": 1e-3},
    "host lr 2e-4": {"init": "host", "lr": 2e-4},
    "host lr 5e-4": {"init": "host", "lr": 5e-4},
    "host lr 1e-3": {"init": "host", "lr": 1e-3},
    "host lr 3e-3": {"init": "host", "lr": 3e-3},
    "host lr 1e-3 K annealed over 25%": {"init": "host", "lr": 1e-3, "k_anneal": 0.25},
    "host lr 1e-3 no cool-down": {"init": "host", "lr": 1e-3, "cooldown": 0.0},
    "new": {},  # TrainConfig's defaults as they stand
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Folder for the runs, the activation cache and sweep.json.")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--expansion", type=float, default=4.0)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="Comma-separated names from SETTINGS.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", action="store_true", help="Two tiny runs on few tokens (for tests).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = ["old", "new"] if args.fast else args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")

    model, tokenizer = load_model("smollm2")
    results = []
    for name in names:
        config = TrainConfig(
            model="smollm2", layers=args.layer, out=str(args.out / name.replace(" ", "_")),
            expansion=0.5 if args.fast else args.expansion, k=8 if args.fast else args.k,
            tokens=2048 if args.fast else args.tokens, context=128 if args.fast else 256, eval_tokens=1024 if args.fast else 8192,
            lm_loss_tokens=256 if args.fast else 2048, checkpoint_every=0, cache_dir=str(args.out / "activations"),
            **SETTINGS[name],
        )
        start = time.perf_counter()
        info = train(config, model=model, tokenizer=tokenizer)[args.layer].training_info
        results.append({"setting": name, **SETTINGS[name], "seconds": time.perf_counter() - start, **info})
    (args.out / "sweep.json").write_text(json.dumps(results, indent=2))

    print(f"\nSmolLM2 layer {args.layer}, {results[0]['n_heads']} heads, K {results[0]['k']}, {results[0]['tokens']} tokens")
    print("| setting | held-out EV | linear | other domain EV | linear | LM loss original -> spliced | dead heads | time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['setting']} | {r['explained_variance']:.3f} | {r['linear_baseline_ev']:.3f} | {r['ood_explained_variance']:.3f} | "
              f"{r['ood_linear_baseline_ev']:.3f} | {r['lm_loss_original']:.3f} -> {r['lm_loss_spliced']:.3f} | "
              f"{r['dead_heads_fraction']:.1%} | {r['seconds']:.0f} s |")


if __name__ == "__main__":
    main()

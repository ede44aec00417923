"""Train the project's shipped Lorsa modules for SmolLM2-135M-Instruct, on one or two CPU cores.

- `--layer 3` (`--lorsa 3=default`): 1152 rank-1 OV heads over 9 QK heads of width 64, K = 32, started from the
  exact copy of the layer (init "attention", the size of `Lorsa.from_attention`), Adam lr 1e-3, 401k tokens.
- `--layer 23` (`--lorsa 23=default`): the layer where `heads detect` finds the strongest MHSA induction heads
  (docs/heads.md); `--layer 18` (`--lorsa 18=default`): the layer whose MHSA induction heads the model needs most
  (ablating L18.A6 alone costs half of the repeated-token accuracy). Both with the toolkit's defaults at the
  paper's shape: 4608 heads (expansion 8) over 9 QK heads, K = 64, init "host", lr 5e-4; 6M tokens (22 epochs of
  the corpus; 30 to 45 minutes on 2 cores here, 4 to 7 of them for the first epoch, which runs the host).

The text is the built-in offline corpus, what every Python installation carries (the language reference behind
`help()` and the docstrings of well-documented standard modules), so the run needs no download. Activations are
cached in the run folder, so every epoch after the first skips the host model.

Writes only under --out: the run (L<layer>/ with metrics.jsonl and training.png, checkpoints; rerunning resumes)
and, in OUT/module, the float16 module. To make it the shipped default, copy it:

    nice python examples/train_default_modules.py --layer 18 --out runs/smollm2-L18 [--threads 2]
    cp runs/smollm2-L18/module/* lorsa_surgery/default_modules/smollm2-L18/
    lorsa-surgery heads detect smollm2 --lorsa 18=default --write-catalog     # its head catalog
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from lorsa_surgery.training.trainer import TrainConfig, train

RECIPES = {
    3: dict(init="attention", k=32, lr=1e-3, tokens=400_000, eval_every=50, checkpoint_every=25),
    18: dict(tokens=6_000_000, eval_every=500, checkpoint_every=250),
    23: dict(tokens=6_000_000, eval_every=500, checkpoint_every=250),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, choices=sorted(RECIPES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="Run folder; the module goes to OUT/module.")
    parser.add_argument("--tokens", type=int, default=None, help="Training tokens (default: the recipe's).")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--fast", action="store_true", help="A few steps on few held-out tokens (for tests).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recipe = dict(RECIPES[args.layer])
    tokens = 4096 if args.fast else args.tokens or recipe.pop("tokens")
    recipe.pop("tokens", None)
    config = TrainConfig(
        model="smollm2", layers=args.layer, out=str(args.out), tokens=tokens, batch_size=8, context=256,
        eval_tokens=2048 if args.fast else 16384, lm_loss_tokens=512 if args.fast else 4096,
        cache_dir=str(args.out / "activations"), resume=True, **recipe,
    )
    lorsa = train(config)[args.layer]

    # Ship it small: float16 weights (the loader reads them back as float32).
    module = args.out / "module"
    copy.deepcopy(lorsa).half().save_pretrained(module, overwrite=True)  # a rerun replaces its own module
    print(json.dumps(lorsa.training_info, indent=2))
    print(f"Saved {module} ({sum(f.stat().st_size for f in module.iterdir()) / 1e6:.1f} MB) and the run in {args.out}")


if __name__ == "__main__":
    main()

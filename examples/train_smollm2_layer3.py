"""Train the project's default Lorsa module: SmolLM2-135M-Instruct, attention layer 3, on one or two CPU cores.

The module has 1152 rank-1 OV heads over 9 QK heads of width 64, K = 32. 1152 = 2 x 9 heads x 64 dims is the
size of `Lorsa.from_attention`'s exact copy of the layer, which is where training starts (init "attention"):
from an exact but dense decomposition, top-K forces it to become sparse and training repairs the damage.

The text is the built-in offline corpus, what every Python installation carries (the language reference
behind `help()` and the docstrings of well-documented standard modules), so the run needs no download. Activations are cached in
the run folder, so every epoch after the first skips the host model.

Writes only under --out: the run (metrics.jsonl, training.png, checkpoints; rerunning resumes) and, in
OUT/module, the float16 module. To make it the shipped default that `--lorsa 3=default` loads, copy it:

    nice python examples/train_smollm2_layer3.py --out runs/smollm2-L3 [--tokens 400000] [--threads 2]
    cp runs/smollm2-L3/module/* lorsa_surgery/default_modules/smollm2-L3/
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from lorsa_surgery.training import TrainConfig, train

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Run folder; the module goes to OUT/module.")
    parser.add_argument("--tokens", type=int, default=400_000, help="Training tokens.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--fast", action="store_true", help="A few steps on few held-out tokens (for tests).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = TrainConfig(
        model="smollm2", layers=3, out=str(args.out), init="attention", k=32, tokens=4096 if args.fast else args.tokens,
        batch_size=8, context=256, eval_tokens=2048 if args.fast else 16384, lm_loss_tokens=512 if args.fast else 4096,
        eval_every=50, lr=1e-3, checkpoint_every=25, cache_dir=str(args.out / "activations"), resume=True,
    )
    lorsa = train(config)[3]

    # Ship it small: float16 weights (the loader reads them back as float32).
    module = args.out / "module"
    copy.deepcopy(lorsa).half().save_pretrained(module)
    print(json.dumps(lorsa.training_info, indent=2))
    print(f"Saved {module} ({sum(f.stat().st_size for f in module.iterdir()) / 1e6:.1f} MB) and the run in {args.out}")


if __name__ == "__main__":
    main()

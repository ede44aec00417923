"""Train the project's default Lorsa module: SmolLM2-135M-Instruct, attention layer 3, on one or two CPU cores.

The module has 1152 rank-1 OV heads over 9 QK heads of width 64, K = 32. 1152 = 2 x 9 heads x 64 dims is the
size of `Lorsa.from_attention`'s exact copy of the layer, which is where training starts (init "attention"):
from an exact but dense decomposition, top-K forces it to become sparse and training repairs the damage.

The text is the built-in offline corpus, what every Python installation carries (the language reference
behind `help()` and the docstrings of well-documented standard modules), so the run needs no download. Activations are cached in
the run folder, so every epoch after the first skips the host model.

Writes runs/smollm2-L3/ (metrics.jsonl, training.png, checkpoints; rerunning resumes) and the float16 module
lorsa_surgery/default_modules/smollm2-L3/, which `--lorsa 3=default` loads. Run it from the repository root:

    nice python examples/train_smollm2_layer3.py [--tokens 400000] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from lorsa_surgery.training import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "runs" / "smollm2-L3"
DEFAULT_MODULE = ROOT / "lorsa_surgery" / "default_modules" / "smollm2-L3"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=400_000, help="Training tokens.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = TrainConfig(
        model="smollm2", layer=3, out=str(RUN), init="attention", k=32, tokens=args.tokens, batch_size=8, context=256,
        eval_tokens=16384, lm_loss_tokens=4096, eval_every=50, lr=1e-3, checkpoint_every=25,
        cache_dir=str(RUN / "activations"), resume=True,
    )
    lorsa = train(config)

    # Ship it small: float16 weights (the loader reads them back as float32).
    shipped = copy.deepcopy(lorsa).half()
    shipped.save_pretrained(DEFAULT_MODULE)
    info = lorsa.training_info
    print(json.dumps(info, indent=2))
    print(f"Saved {DEFAULT_MODULE.relative_to(ROOT)} "
          f"({sum(f.stat().st_size for f in DEFAULT_MODULE.iterdir()) / 1e6:.1f} MB) and {RUN.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()

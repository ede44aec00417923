"""End-to-end training throughput (host capture + Lorsa steps) for one layer against several layers in one pass,
side by side in one run, on the embedded SmolLM2; and whether each module trained together equals the one trained
alone with the same seed.

    python benchmarks/train_layers.py                         # layers 3, 10, 17; expansion 4, K 32, 16k tokens
    python benchmarks/train_layers.py --layers 3,17 --tokens 32768 --rounds 2
    python benchmarks/train_layers.py --layers $(seq -s, 0 29) --expansion 1 --k 64 --tokens 8192 --each-alone

Rounds alternate (deepest alone, or with --each-alone every layer alone; then all together) so that both see the same machine load; no activation cache, so
every step runs the host. The table reports medians over rounds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lorsa_surgery import load_model
from lorsa_surgery.training.trainer import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="3,10,17")
    parser.add_argument("--expansion", type=float, default=4.0)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--each-alone", action="store_true",
                        help="Train every layer alone, not only the deepest: 30 single-layer runs summed against one pass.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers = tuple(int(x) for x in args.layers.split(","))
    deepest = max(layers)
    model, tokenizer = load_model("smollm2")
    tmp = Path(tempfile.mkdtemp(prefix="lorsa-layers-"))

    def run(chosen: tuple[int, ...], name: str):
        out = tmp / name
        shutil.rmtree(out, ignore_errors=True)
        config = TrainConfig(model="smollm2", layers=chosen, out=str(out), expansion=args.expansion, k=args.k,
                             tokens=args.tokens, eval_tokens=256, lm_loss_tokens=0, checkpoint_every=0)
        start = time.perf_counter()
        modules = train(config, model=model, tokenizer=tokenizer)
        return time.perf_counter() - start, modules

    times = {"alone": [], "together": []}
    steps = {"alone": [], "together": []}
    runs = [("alone", (layer,)) for layer in (layers if args.each_alone else (deepest,))] + [("together", layers)]
    for _ in range(args.rounds):
        loop = {"alone": 0.0, "together": 0.0}
        lorsa = {"alone": 0.0, "together": 0.0}
        for name, chosen in runs:
            seconds, modules = run(chosen, name)
            info = next(iter(modules.values())).training_info  # every module of a run shares its loop
            loop[name] += info["tokens"] / info["tokens_per_s"]
            lorsa[name] += sum(m.training_info["tokens"] / m.training_info["lorsa_step_tokens_per_s"] for m in modules.values())
            if deepest in modules:
                weights = {k: v.clone() for k, v in modules[deepest].state_dict().items()}
                alone, together = (weights, None) if name == "alone" else (alone, weights)
        for name in loop:
            times[name].append(loop[name])
            steps[name].append(lorsa[name])
    diff = max((alone[k] - together[k]).abs().max().item() for k in alone)
    tokens = modules[deepest].training_info["tokens"]
    n_heads = modules[deepest].training_info["n_heads"]
    print(f"\nSmolLM2 training, {n_heads} heads per layer, K {args.k}, {tokens} tokens, {args.threads} threads, "
          f"no activation cache; medians of {args.rounds} round(s)\n")
    print(f"| run | training loop s | of which Lorsa steps s | tokens/s end to end | time / {'all' if args.each_alone else 'deepest'} alone |")
    print("|---|---|---|---|---|")
    base = statistics.median(times["alone"])
    alone_label = f"each of the {len(layers)} layers alone, summed" if args.each_alone else f"layer {deepest} alone"
    together_label = f"layers {', '.join(map(str, layers)) if len(layers) < 8 else f'{min(layers)}-{max(layers)}'} in one pass"
    for name, label in (("alone", alone_label), ("together", together_label)):
        t = statistics.median(times[name])
        print(f"| {label} | {t:.1f} | {statistics.median(steps[name]):.1f} | {tokens / t:.0f} | {t / base:.2f}x |")
    print(f"\nlayer {deepest}: largest weight difference between trained alone and trained together: {diff:.2e}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

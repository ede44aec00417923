"""End-to-end training throughput (host capture + Lorsa steps) for one layer against several layers in one pass,
side by side in one run, on the embedded SmolLM2; and whether each module trained together equals the one trained
alone with the same seed.

    python benchmarks/train_layers.py                         # layers 3, 10, 17; expansion 4, K 32, 16k tokens
    python benchmarks/train_layers.py --layers 3,17 --tokens 32768 --rounds 2

Rounds alternate (deepest alone, all together) so that both see the same machine load; no activation cache, so
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
    for _ in range(args.rounds):
        for name, chosen in (("alone", (deepest,)), ("together", layers)):
            seconds, modules = run(chosen, name)
            info = modules[deepest].training_info
            times[name].append(info["tokens"] / info["tokens_per_s"])
            steps[name].append(sum(m.training_info["tokens"] / m.training_info["lorsa_step_tokens_per_s"] for m in modules.values()))
            if name == "alone":
                alone = {k: v.clone() for k, v in modules[deepest].state_dict().items()}
            else:
                together = modules[deepest].state_dict()
    diff = max((alone[k] - together[k]).abs().max().item() for k in alone)
    tokens = modules[deepest].training_info["tokens"]
    n_heads = modules[deepest].training_info["n_heads"]
    print(f"\nSmolLM2 training, {n_heads} heads per layer, K {args.k}, {tokens} tokens, {args.threads} threads, "
          f"no activation cache; medians of {args.rounds} round(s)\n")
    print("| run | training loop s | of which Lorsa steps s | tokens/s end to end | time / deepest alone |")
    print("|---|---|---|---|---|")
    base = statistics.median(times["alone"])
    for name, label in (("alone", f"layer {deepest} alone"), ("together", f"layers {', '.join(map(str, layers))} in one pass")):
        t = statistics.median(times[name])
        print(f"| {label} | {t:.1f} | {statistics.median(steps[name]):.1f} | {tokens / t:.0f} | {t / base:.2f}x |")
    print(f"\nlayer {deepest}: largest weight difference between trained alone and trained together: {diff:.2e}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

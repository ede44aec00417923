"""Cost of interventions on generation speed, SmolLM2-135M with a sparse Lorsa spliced in: plain spliced generation
vs an empty intervention context vs one steered head (clamped at every generated token).

Prints ratios measured side by side in one run; variants are interleaved (round-robin, best of N) so that
background load affects each alike. On a busy machine, `--clock cpu --threads 1` counts this process's CPU time
instead of wall time. The goal for the empty context is under 5% overhead. Usage:

    python benchmarks/intervention_overhead.py [--repeats 5] [--new-tokens 64] [--layer 3] [--threads 2] [--clock wall]
"""

import argparse
import contextlib
import time

import torch

from lorsa_surgery import Lorsa
from lorsa_surgery.interventions.edits import InterventionSet, Steer
from lorsa_surgery.host.models import load_model
from lorsa_surgery.host.splicing import splice
from lorsa_surgery.host.arch import exact_copy

PROMPT = "The lighthouse keeper climbed the spiral stairs every evening at dusk. He checked the oil, trimmed the wick,"


@torch.no_grad()
def tokens_per_second(model, ids, new_tokens: int, interventions: InterventionSet | None, clock=time.perf_counter) -> float:
    scope = interventions.applied(model) if interventions is not None else contextlib.nullcontext()
    with scope:
        start = clock()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        elapsed = clock() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return new_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    L = args.layer
    lorsa = exact_copy(model, L)
    lorsa.cfg.act_fn, lorsa.cfg.top_k = "topk", 64  # 1152 heads, 64 firing per token
    contexts = {
        "plain": None,
        "empty context": InterventionSet(),
        "one steer": InterventionSet([Steer(f"L{L}.H5", clamp=2.0, positions="generated")]),
    }
    best = {(mode, name): 0.0 for mode in ("replace", "exact") for name in contexts}
    for mode in ("replace", "exact"):
        with splice(model, {L: lorsa}, mode=mode):
            tokens_per_second(model, ids, 8, None)  # warm-up
            for _ in range(args.repeats):
                for name, chosen in contexts.items():
                    best[mode, name] = max(best[mode, name], tokens_per_second(model, ids, args.new_tokens, chosen, clock))

    print(f"SmolLM2-135M-Instruct, fp32, CPU, {args.threads} threads, {args.clock} clock, Lorsa at layer {L} "
          f"(1152 heads, K=64), prompt {ids.shape[1]} tokens, {args.new_tokens} new, best of {args.repeats}\n")
    print(f"| {'mode':<8} | {'variant':<14} | {'tokens/s':>9} | {'vs plain':>9} |")
    print(f"|{'-' * 10}|{'-' * 16}|{'-' * 11}|{'-' * 11}|")
    for (mode, name), speed in best.items():
        ratio = speed / best[mode, "plain"]
        print(f"| {mode:<8} | {name:<14} | {speed:>9.1f} | {ratio:>8.3f}x |")


if __name__ == "__main__":
    main()

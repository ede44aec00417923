"""Greedy generation speed on SmolLM2-135M: original vs spliced, and Lorsa's KV-cached decode step vs
recomputing the whole prefix at every step (the reference implementation's only option).

Prints ratios measured side by side in one run; runs are interleaved (round-robin, best of N) so that
background load on the machine affects every variant alike. Usage:

    python benchmarks/generation.py [--repeats 3] [--layer 3] [--threads 2] [--module-only]

The second table isolates the Lorsa module: one cached decode step per new token against rerunning the
module over the whole prefix for each new token.
"""

import argparse
import time

import torch

from lorsa_surgery import Lorsa, LorsaCache
from lorsa_surgery.host.models import load_model
from lorsa_surgery.host.splicing import splice
from lorsa_surgery.host.arch import exact_copy

PROMPT = "The lighthouse keeper climbed the spiral stairs every evening at dusk. He checked the oil, trimmed the wick,"


def sparse(model, layer: int, k: int = 64) -> Lorsa:
    lorsa = exact_copy(model, layer)
    lorsa.cfg.act_fn, lorsa.cfg.top_k = "topk", k
    return lorsa


@torch.no_grad()
def tokens_per_second(model, ids, new_tokens: int, modules, use_cache: bool = True) -> float:
    def run():
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache)
        assert out.shape[1] == ids.shape[1] + new_tokens
        return new_tokens / (time.perf_counter() - start)

    if modules is None:
        return run()
    with splice(model, modules):
        return run()


@torch.no_grad()
def module_decode_rates(lorsa: Lorsa, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """Tokens/s of the Lorsa module alone: cached steps vs recomputing the prefix at every step."""
    x = torch.randn(1, prompt_len + new_tokens, lorsa.cfg.d_model)
    start = time.perf_counter()
    cache = LorsaCache()
    lorsa(x[:, :prompt_len], cache=cache)
    for t in range(prompt_len, prompt_len + new_tokens):
        lorsa(x[:, t : t + 1], cache=cache)
    cached = new_tokens / (time.perf_counter() - start)
    start = time.perf_counter()
    for t in range(prompt_len, prompt_len + new_tokens):
        lorsa(x[:, : t + 1])
    recompute = new_tokens / (time.perf_counter() - start)
    return cached, recompute


def module_table(lorsa: Lorsa, prompt_len: int, repeats: int) -> None:
    print(f"\nLorsa module alone (1152 heads, K=64), prompt {prompt_len} tokens, best of {repeats}\n")
    print(f"| {'new tokens':>10} | {'cached tokens/s':>15} | {'recompute tokens/s':>18} | {'ratio':>7} |")
    print(f"|{'-' * 12}|{'-' * 17}|{'-' * 20}|{'-' * 9}|")
    for n in (64, 256):
        cached, recompute = (max(r) for r in zip(*(module_decode_rates(lorsa, prompt_len, n) for _ in range(repeats))))
        print(f"| {n:>10} | {cached:>15.1f} | {recompute:>18.1f} | {cached / recompute:>6.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--module-only", action="store_true", help="Only the Lorsa-module table.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    L = args.layer
    if args.module_only:
        module_table(sparse(model, L), ids.shape[1], args.repeats)
        return
    variants = {
        "original": (None, True, 64),
        "spliced from_attention (1152 heads, all fire)": ({L: exact_copy(model, L)}, True, 64),
        "spliced sparse (1152 heads, K=64)": ({L: sparse(model, L)}, True, 64),
        "sparse, cached, 64 new": ({L: sparse(model, L)}, True, 64),
        "sparse, recompute prefix, 64 new": ({L: sparse(model, L)}, False, 64),
        "sparse, cached, 256 new": ({L: sparse(model, L)}, True, 256),
        "sparse, recompute prefix, 256 new": ({L: sparse(model, L)}, False, 256),
    }
    tokens_per_second(model, ids, 8, None)  # warm-up
    best = {name: 0.0 for name in variants}
    for _ in range(args.repeats):
        for name, (modules, use_cache, n) in variants.items():
            best[name] = max(best[name], tokens_per_second(model, ids, n, modules, use_cache))

    print(f"SmolLM2-135M-Instruct, fp32, CPU, {args.threads} threads, prompt {ids.shape[1]} tokens, best of {args.repeats}\n")
    print(f"| {'variant':<46} | {'tokens/s':>9} | {'ratio':>24} |")
    print(f"|{'-' * 48}|{'-' * 11}|{'-' * 26}|")
    rows = [
        ("original", "original", "1.00 (baseline)"),
        ("spliced from_attention (1152 heads, all fire)", "original", None),
        ("spliced sparse (1152 heads, K=64)", "original", None),
        ("sparse, cached, 64 new", "sparse, recompute prefix, 64 new", None),
        ("sparse, recompute prefix, 64 new", None, None),
        ("sparse, cached, 256 new", "sparse, recompute prefix, 256 new", None),
        ("sparse, recompute prefix, 256 new", None, None),
    ]
    for name, against, fixed in rows:
        ratio = fixed or (f"{best[name] / best[against]:.2f}x vs {'original' if against == 'original' else 'recompute'}" if against else "")
        print(f"| {name:<46} | {best[name]:>9.1f} | {ratio:>24} |")
    module_table(sparse(model, L), ids.shape[1], args.repeats)


if __name__ == "__main__":
    main()

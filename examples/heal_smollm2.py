"""Heal a SmolLM2 with two spliced layers, then save it with its adapter and load it back.

Layer 3 gets the shipped Lorsa module; layer 10 gets the exact copy of its attention made sparse (top-8 of its
1152 rank-1 heads), which costs more LM loss. Healing trains both modules end to end and rank-8 LoRA adapters on
every linear layer from layer 3 on, against the KL divergence from the original model, on text sampled from SmolLM2
itself (healing's default).
It prints the held-out KL and LM-loss gap before and after, checks that the heads are still top-K sparse and the
catalogs unchanged, and writes the healed patched model to --out.

    python examples/heal_smollm2.py --out runs/healed-smollm2 [--tokens 50000] [--fast]
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import lorsa_surgery as ls


def sparse_copy(model, layer: int, k: int) -> ls.Lorsa:
    lorsa = ls.exact_copy(model, layer)
    lorsa.cfg.act_fn, lorsa.cfg.top_k = "topk", k
    return lorsa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Folder for the healed patched model.")
    parser.add_argument("--tokens", type=int, default=50_000, help="Healing tokens.")
    parser.add_argument("--fast", action="store_true", help="A few steps only (for tests).")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = ls.load_model("smollm2")
    modules = {3: ls.module_for(model, 3, "default"), 10: sparse_copy(model, 10, 8)}
    catalogs = {layer: copy.deepcopy(m.catalog) for layer, m in modules.items()}
    handle = ls.splice(model, modules)
    # The fast run heals on the built-in documentation: sampling text first would take longer than its few steps.
    config = ls.HealConfig(tokens=2048 if args.fast else args.tokens, eval_tokens=1024 if args.fast else 8192,
                           sample_tokens=0 if args.fast else None)
    report = ls.heal(handle, tokenizer, config)

    ids = tokenizer("The committee met on Tuesday to discuss the budget for the new library.", return_tensors="pt").input_ids
    with ls.Recorder(handle, [f"L{layer}.H0-{m.cfg.n_ov_heads - 1}" for layer, m in modules.items()]) as rec:
        with torch.no_grad():
            model(ids)
    fired = (rec.activations() != 0).sum(-1)  # [1, T]: heads firing per token, over both layers
    assert int(fired.max()) <= sum(m.cfg.top_k for m in modules.values()), "top-K sparsity must survive healing"
    assert {layer: m.catalog for layer, m in handle.modules().items()} == catalogs

    ls.save_patched(handle, args.out, metrics={"healing": report}, overwrite=True)
    print(json.dumps({k: report[k] for k in ("before", "after", "tokens", "trained", "lora_rank")}, indent=2))
    before, after = report["before"], report["after"]
    print(f"held-out KL to the original: {before['kl']:.4f} -> {after['kl']:.4f} nats/token; "
          f"LM-loss gap: {before['lm_loss_gap']:+.4f} -> {after['lm_loss_gap']:+.4f} "
          f"({after['lm_loss_gap'] / before['lm_loss_gap']:.2f} of before); at most {int(fired.max())} heads fire per token")


if __name__ == "__main__":
    main()

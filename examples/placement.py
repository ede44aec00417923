"""Place a spliced SmolLM2 with an Accelerate device map, and check it computes what the unplaced model does.

Loads the embedded SmolLM2 twice: whole in memory, and under a memory cap that keeps part of the layers in memory
and offloads the rest to disk (on a GPU machine, pass --max-memory "0=200MB,cpu=2GB" to split it across the GPU and
the CPU). The automatic map reserves room for the shipped layer-3 and layer-23 Lorsa modules on their layers
(`ls.infer_device_map`), so every module lands beside the layer it replaces. It prints where each part went and
the largest logit difference between the two placements, spliced and with a head ablated.

    python examples/placement.py [--max-memory cpu=260MB] [--fast]
"""

from __future__ import annotations

import argparse
import collections
import tempfile

import torch

import lorsa_surgery as ls

PROMPT = "The lighthouse keeper climbed the stairs and"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-memory", default="cpu=260MB", help="Accelerate's memory cap, e.g. 0=200MB,cpu=2GB.")
    parser.add_argument("--fast", action="store_true", help="Only the layer-3 module (for tests).")
    args = parser.parse_args()
    layers = [3] if args.fast else [3, 23]

    reference, tok = ls.load_model("smollm2")
    modules = {layer: ls.module_for(reference, layer, "default") for layer in layers}
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with tempfile.TemporaryDirectory() as offload:
        placed, _ = ls.load_model("smollm2", max_memory=args.max_memory, offload_dir=offload, lorsa=modules)
        where = collections.Counter(str(d) for d in placed.hf_device_map.values())
        print(f"device map under {args.max_memory}: " + ", ".join(f"{n} parts on {d}" for d, n in sorted(where.items())))
        ablate = ls.InterventionSet([ls.Ablate(f"L{layers[-1]}.H0-63")])
        logits = {}
        for name, model in (("in memory", reference), ("placed", placed)):
            with ls.splice(model, {layer: m for layer, m in modules.items()}) as handle, torch.no_grad():
                spliced = model(ids.to(ls.input_device(model))).logits.float().cpu()
                with ablate.applied(handle):
                    ablated = model(ids.to(ls.input_device(model))).logits.float().cpu()
            logits[name] = spliced, ablated
    for i, what in enumerate(("spliced", f"spliced, L{layers[-1]}.H0-63 ablated")):
        gap = float((logits["in memory"][i] - logits["placed"][i]).abs().max())
        print(f"{what}: largest logit difference between the placements {gap:.2e}")


if __name__ == "__main__":
    main()

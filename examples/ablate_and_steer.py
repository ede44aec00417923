"""Find, break, restore and steer heads of SmolLM2 through Lorsa, end to end.

1. Splice exact Lorsa copies of layers 17 and 18 (each MHSA head split into 128 rank-1 heads) in exact mode.
2. Ablate each MHSA head's group of rank-1 heads in turn and measure in-context copying of a repeated random
   token sequence: the induction heads stand out.
3. Ablate the four strongest together (copying collapses), as many others (it does not), then patch the
   strongest back in from a clean run (it returns).
4. Steer one rank-1 head during generate(), read its activation back at the generated tokens, and compare
   the text with the unsteered continuation.
5. Save the steering as JSON and write an HTML dashboard for one induction head.

    python examples/ablate_and_steer.py [--out example-output]
"""

import argparse
from pathlib import Path

import torch

from lorsa_surgery import Lorsa
from lorsa_surgery.analysis.attribution import logit_attribution, token_text
from lorsa_surgery.analysis.pages import dashboard
from lorsa_surgery.host.corpus import load_texts
from lorsa_surgery.interventions.edits import Ablate, InterventionSet, Patch, Recorder, Steer
from lorsa_surgery.host.metrics import token_windows
from lorsa_surgery.host.models import load_model
from lorsa_surgery.interventions.patching import cache_run, forward
from lorsa_surgery.host.splicing import splice
from lorsa_surgery.host.arch import exact_copy

LAYERS = (17, 18)
N_HEADS, HEAD_DIM = 9, 64  # SmolLM2-135M attention


def group(layer: int, head: int) -> str:
    """The rank-1 heads of a from_attention module that make up MHSA head `head`."""
    width = 2 * HEAD_DIM
    return f"L{layer}.H{head * width}-{(head + 1) * width - 1}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("example-output"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    handle = splice(model, {layer: exact_copy(model, layer) for layer in LAYERS}, mode="exact")

    n = 16
    half = torch.randint(1000, 20000, (2, n))
    repeated = torch.cat([half, half], 1)

    def copying(records=()) -> float:
        """Accuracy of predicting the second copy of the sequence."""
        with InterventionSet(records).applied(handle):
            logits = forward(handle, repeated)
        return float((logits[:, n:-1].argmax(-1) == repeated[:, n + 1 :]).float().mean())

    base = copying()
    print(f"copying accuracy on a repeated random sequence: {base:.2f}\n")
    print("ablating one MHSA head's 128 rank-1 heads at a time:")
    scores = {}
    for layer in LAYERS:
        for head in range(N_HEADS):
            scores[layer, head] = copying([Ablate(group(layer, head))])
            print(f"  L{layer} head {head}: {scores[layer, head]:.2f}")
    ranked = sorted(scores, key=scores.get)
    strongest = ",".join(group(*key) for key in ranked[:4])
    others = ",".join(group(*key) for key in ranked[-4:])
    print(f"\nstrongest: {', '.join(f'L{l} head {h}' for l, h in ranked[:4])}")
    print(f"  ablated together:                  {copying([Ablate(strongest)]):.2f}")
    print(f"  four others ablated:               {copying([Ablate(others)]):.2f}")
    clean = cache_run(handle, repeated, strongest)
    print(f"  ablated, then patched from clean:  {copying([Ablate(strongest), Patch(strongest, clean)]):.2f}\n")

    # Steering: the first rank-1 head of the strongest induction head, clamped at every generated token.
    layer, head = ranked[0]
    ref = f"L{layer}.H{head * 2 * HEAD_DIM}"
    promoted = [token_text(tok, t) for t, _ in logit_attribution(handle, ref, k=5).promoted]
    steer = InterventionSet([Steer(ref, clamp=30.0, positions="generated")])
    prompt = tok("The lighthouse keeper climbed the stairs and", return_tensors="pt")
    generate = dict(max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    plain = model.generate(**prompt, **generate)
    with steer.applied(handle), Recorder(handle, ref) as rec:
        steered = model.generate(**prompt, **generate)
    P = prompt.input_ids.shape[1]
    print(f"steering {ref} (its output direction promotes {promoted}) to 30 at generated tokens")
    print(f"  read back at generated positions: {rec.activations(ref)[0, P:].unique().tolist()}")
    print(f"  plain:   {tok.decode(plain[0, P:])!r}")
    print(f"  steered: {tok.decode(steered[0, P:])!r}\n")

    steer.save(args.out / "steer.json")
    windows = list(token_windows(tok, load_texts(), 128))
    page = dashboard(handle, tok, ref, windows, args.out / "induction-head.html", k=8)
    print(f"wrote {args.out / 'steer.json'} and {page}")


if __name__ == "__main__":
    main()

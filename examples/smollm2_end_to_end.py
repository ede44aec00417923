"""Every job of the toolkit on the real SmolLM2, in one script: train a Lorsa module, splice it, detect its head
families, ablate and steer heads, generate, and push the patched model with its card.

    python examples/smollm2_end_to_end.py --repo-id NS/NAME [--layer 3] [--tokens 100000] [--out runs/e2e]
    python examples/smollm2_end_to_end.py --repo-id NS/NAME --fast      # 4096 training tokens (for tests)

It pushes to the Hub at $HF_ENDPOINT (huggingface.co when unset) with the usual token; without a token it saves the
folder and says so. A module trained on 100k tokens is far weaker than the shipped ones (`--lorsa 3=default`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from huggingface_hub import get_token

import lorsa_surgery as ls
from lorsa_surgery.analysis.attribution import token_text

PROMPT = "The lighthouse keeper climbed the stairs and"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo-id", required=True, help="Target model repo, NS/NAME.")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=100_000, help="Training tokens.")
    parser.add_argument("--out", type=Path, default=Path("runs/e2e"))
    parser.add_argument("--fast", action="store_true", help="4096 training tokens, few prompts (for tests).")
    args = parser.parse_args()
    n_prompts = 4 if args.fast else 16

    model, tok = ls.load_model("smollm2")
    config = ls.TrainConfig(model="smollm2", layers=args.layer, out=str(args.out / "train"), init="attention", k=32,
                            tokens=4096 if args.fast else args.tokens, batch_size=8, context=256,
                            eval_tokens=2048 if args.fast else 16384, lm_loss_tokens=512 if args.fast else 4096)
    lorsa = ls.train(config, model=model, tokenizer=tok)[args.layer]
    info = lorsa.training_info
    print(f"trained L{args.layer}: {lorsa.cfg.n_ov_heads} heads, held-out explained variance "
          f"{info.get('explained_variance', float('nan')):.3f}")

    found = ls.detect(model, tok, args.layer, lorsa, n_prompts=n_prompts)
    print("head families: " + ", ".join(f"{name} {len(fs.members())}" for name, fs in found.items()))
    best = int(found["previous_token"].scores.argmax())
    ref = f"L{args.layer}.H{best}"

    report = ls.splice_report(model, tok, {args.layer: lorsa}, ls.prose()[:4])
    print(f"LM loss on prose: original {report['lm_loss']['original']:.4f}, spliced {report['lm_loss']['spliced']:.4f}")
    handle = ls.splice(model, {args.layer: lorsa})
    ids = tok(PROMPT, return_tensors="pt").input_ids
    settings = dict(max_new_tokens=8 if args.fast else 20, do_sample=False, pad_token_id=tok.eos_token_id)
    texts = {"spliced": model.generate(ids, **settings)}
    with ls.InterventionSet([ls.Ablate(f"L{args.layer}.H0-{lorsa.cfg.n_ov_heads - 1}")]).applied(handle):
        texts["every head ablated"] = model.generate(ids, **settings)
    with ls.InterventionSet([ls.Steer(ref, clamp=100.0, positions="generated")]).applied(handle):
        texts[f"{ref} (best previous-token head) clamped at 100"] = model.generate(ids, **settings)
    for name, out in texts.items():
        print(f"{name}: {tok.decode(out[0, ids.shape[1]:])!r}")
    promoted = [token_text(tok, t) for t, _ in ls.logit_attribution(handle, ref, k=5).promoted]
    print(f"{ref} promotes {promoted}")

    folder = ls.save_patched(handle, args.out / "patched", metrics=report, repo_id=args.repo_id, overwrite=True)
    if get_token() is None:
        print(f"No Hub token: saved {folder}, not pushed")
        return
    print(f"Pushed: {ls.push_folder(folder, args.repo_id, commit_message='SmolLM2 with a Lorsa module').commit_url}")


if __name__ == "__main__":
    main()

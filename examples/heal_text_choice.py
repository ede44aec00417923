"""What text should healing train on by default? The same splice healed three times with the same budget, on the
built-in documentation, on text sampled from the host itself, and on half of each, each judged on held-out text of
all three kinds: documentation, sampled text and English prose of other domains (never trained on by any run).

The splice is SmolLM2 with the shipped modules of layers 3, 18 and 23, healed with `HealConfig`'s defaults except for
its text and --tokens. The training files hold about --tokens tokens each, so every run reads each sequence once.

    python examples/heal_text_choice.py --out runs/heal-text [--tokens 20480] [--threads 2] [--fast]

Writes report.json to --out and prints a table of KL to the original (nats per token) before and after.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import lorsa_surgery as ls
from lorsa_surgery.host import corpus
from lorsa_surgery.training.healing import evaluate
from lorsa_surgery.training.trainer import token_sequences

LAYERS = (3, 18, 23)
CONTEXT = ls.HealConfig.context


def take(docs: list[str], tokenizer, n_tokens: int) -> tuple[list[str], list[str]]:
    """(the first documents that hold about n_tokens tokens, the rest)."""
    count = 0
    for i, doc in enumerate(docs):
        if count >= n_tokens:
            return docs[:i], docs[i:]
        count += len(tokenizer(doc, add_special_tokens=False).input_ids) + 1
    return docs, []


def write(docs: list[str], path: Path) -> str:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Folder for report.json and the training files.")
    parser.add_argument("--tokens", type=int, default=20_480, help="Healing tokens of every run.")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="Held-out tokens of each kind of text.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", action="store_true", help="Small sizes (for a smoke run).")
    args = parser.parse_args()
    layers = LAYERS[:1] if args.fast else LAYERS
    if args.fast:
        args.tokens, args.eval_tokens = 256, 128
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = ls.load_model("smollm2")

    docs = corpus.python_documentation()
    random.Random(0).shuffle(docs)
    docs_held, docs = take(docs, tokenizer, args.eval_tokens)
    sampled = corpus.sample_from_model(model, tokenizer, args.tokens + args.eval_tokens, seed=0, length=64 if args.fast else 256)
    sampled_held, sampled = take(sampled, tokenizer, args.eval_tokens)
    half_docs, half_sampled = take(docs, tokenizer, args.tokens // 2)[0], take(sampled, tokenizer, args.tokens // 2)[0]
    choices = {
        "documentation": [write(take(docs, tokenizer, args.tokens)[0], args.out / "documentation.jsonl")],
        "sampled": [write(sampled, args.out / "sampled.jsonl")],
        "half of each": [write(half_docs, args.out / "half-documentation.jsonl"),
                         write(half_sampled, args.out / "half-sampled.jsonl")],
    }
    held = {name: token_sequences(texts, tokenizer, CONTEXT) for name, texts in (("documentation", docs_held), ("sampled", sampled_held))}
    # Healing measures the prose before and after itself.
    prose = write(corpus.prose()[:1] if args.fast else corpus.prose(), args.out / "prose.jsonl")

    report: dict = {"layers": list(layers), "tokens": args.tokens}
    for name, texts in choices.items():
        handle = ls.splice(model, {layer: ls.module_for(model, layer, "default") for layer in layers})
        measured = {held_name: evaluate(handle, ids, mask)["kl"] for held_name, (ids, mask) in held.items()}
        config = ls.HealConfig(tokens=args.tokens, texts=tuple(texts), ood_texts=(prose,), eval_tokens=CONTEXT)
        start = time.perf_counter()
        healed = ls.heal(handle, tokenizer, config)
        seconds = time.perf_counter() - start
        report.setdefault("unhealed", {**measured, "prose": healed["ood_before"]["kl"]})
        report[name] = {**{held_name: evaluate(handle, ids, mask)["kl"] for held_name, (ids, mask) in held.items()},
                        "prose": healed["ood_after"]["kl"], "heal_seconds": seconds}
        handle.unsplice()  # takes the adapter out too: the next run starts from the original model
        (args.out / "report.json").write_text(json.dumps(report, indent=2))

    kinds = (*held, "prose")
    print(f"KL to the original (nats/token), layers {', '.join(map(str, layers))} spliced, {args.tokens} healing tokens")
    print(f"{'healed on':<16}" + "".join(f"{kind:>15}" for kind in kinds))
    for name in ("unhealed", *choices):
        print(f"{name:<16}" + "".join(f"{report[name][kind]:>15.4f}" for kind in kinds))


if __name__ == "__main__":
    main()

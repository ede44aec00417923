"""`lorsa-surgery replace` and `lorsa-surgery generate`: splice modules into a model, measure, save, run."""

import contextlib
import json
from pathlib import Path

import click

from lorsa_surgery import corpus, models
from lorsa_surgery.cli.interventions import intervention_options, interventions_from_options, require_splice
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.metrics import splice_report
from lorsa_surgery.patched import is_patched_folder, load_patched, module_for, save_patched
from lorsa_surgery.splicing import splice

LORSA_HELP = "LAYER=PATH: a checkpoint folder, Hub id (repo or repo:subfolder), 'default' or 'from-attention'. Repeatable."


def parse_layer_specs(values: tuple[str, ...]) -> dict[int, str]:
    specs = {}
    for value in values:
        layer, sep, spec = value.partition("=")
        if not sep or not layer.strip().isdigit() or not spec:
            raise click.BadParameter(f"{value!r} is not LAYER=PATH.", param_hint="--lorsa")
        specs[int(layer)] = spec
    return specs


def load_with_modules(model_spec, lorsa_specs, mode, revision, base, allow_pickle):
    """(model, tokenizer, handle or None) for a plain model with --lorsa options, or a patched model."""
    specs = parse_layer_specs(lorsa_specs)
    if is_patched_folder(model_spec) or (not Path(model_spec).exists() and _is_patched_repo(model_spec, revision)):
        if specs:
            raise LorsaSurgeryError(
                f"{model_spec} is a patched model that brings its own Lorsa modules; --lorsa applies to a plain model "
                "(pass the base model instead, or leave --lorsa out)."
            )
        return load_patched(model_spec, revision=revision, base=base, mode=mode)
    model, tokenizer = models.load_model(model_spec, revision=revision)
    if not specs:
        return model, tokenizer, None
    modules = {layer: module_for(model, layer, spec, allow_pickle=allow_pickle) for layer, spec in specs.items()}
    return model, tokenizer, splice(model, modules, mode=mode or "replace")


def _is_patched_repo(spec: str, revision: str | None) -> bool:
    """Whether a Hub id names a patched model, i.e. has a root file on the Hub (or in the cache when offline)."""
    if models.resolve(spec)["kind"] != "hub":
        return False
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from lorsa_surgery.hub import HUB_FAILURES, hub_error
    from lorsa_surgery.patched import ROOT_FILE

    try:
        # A download, not file_exists: it answers from the cache under HF_HUB_OFFLINE=1, and the file is small
        # and needed anyway when it exists.
        hf_hub_download(spec, ROOT_FILE, revision=revision)
        return True
    except EntryNotFoundError:  # a plain model repo
        return False
    except LocalEntryNotFoundError:  # offline and not cached: loading it as a plain model reports what is missing
        return False
    except HUB_FAILURES as err:  # an unknown repo, a refused token, an unreachable Hub: say so, once
        raise hub_error(f"Could not read Hub repo '{spec}'", err) from err


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
def replace(model, lorsa_specs, mode, out, texts, max_length, revision, allow_pickle, as_json):
    """Splice Lorsa modules into MODEL (Hub id, folder, .gguf or 'smollm2'), measure, and save the patched model."""
    host, tokenizer = models.load_model(model, revision=revision)
    modules = {layer: module_for(host, layer, spec, allow_pickle=allow_pickle) for layer, spec in parse_layer_specs(lorsa_specs).items()}
    report = splice_report(host, tokenizer, modules, corpus.load_texts(list(texts)), max_length)
    report["text_source"] = ", ".join(Path(t).name for t in texts) or "the built-in sample text"
    handle = splice(host, modules, mode=mode)
    save_patched(handle, out, metrics=report)
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
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", default=40, show_default=True)
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--no-cache", is_flag=True, help="Recompute the whole prefix at every step.")
@click.option("--lorsa", "lorsa_specs", multiple=True, metavar="LAYER=PATH", help=LORSA_HELP)
@click.option("--mode", type=click.Choice(["replace", "exact"]), default=None, help="Splice mode (default: replace, or the patched model's).")
@click.option("--revision", default=None)
@click.option("--base", default=None, help="Base model override for a patched model (Hub id, folder or .gguf).")
@click.option("--allow-pickle", is_flag=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@intervention_options
def generate(model, prompt, max_new_tokens, chat, no_cache, lorsa_specs, mode, revision, base, allow_pickle, sample, temperature, seed,
             ablations, steers, interventions_file):
    """Stream text from MODEL or a patched model (folder or Hub repo), optionally with Lorsa modules spliced in."""
    import torch

    chosen = interventions_from_options(ablations, steers, interventions_file)
    torch.manual_seed(seed)
    host, tokenizer, handle = load_with_modules(model, lorsa_specs, mode, revision, base, allow_pickle)
    require_splice(handle, chosen)
    if not chat:
        click.echo(prompt, nl=False)
    with chosen.applied(handle) if len(chosen) else contextlib.nullcontext():
        models.generate_text(
            host, tokenizer, prompt, max_new_tokens=max_new_tokens, chat=chat, use_cache=not no_cache,
            do_sample=sample, temperature=temperature, stream=lambda piece: click.echo(piece, nl=False),
        )
    click.echo()

"""`lorsa-surgery ablate|steer|patch`: what an intervention on Lorsa heads does to a model's predictions.

Each command builds one intervention, measures it on prompts or text files (loss, KL, next token; a table or
--json) and, with --save DIR, bakes it into a patched model. `generate` takes the same interventions through
`intervention_options`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from lorsa_surgery.host import corpus

from lorsa_surgery.cli.loading import POSITIVE, TEXT, load_with_modules, loading_options, lorsa_option, overwrite_option
from lorsa_surgery.errors import LorsaSurgeryError

if TYPE_CHECKING:
    from lorsa_surgery.interventions.edits import InterventionSet

HEADS_HELP = ("Heads: L3.H5, a range L3.H0-127, a catalog label L3:induction, a QK group L3.QK2, or an MHSA head L3.A2 (with "
              "--lorsa 3=from-attention); comma-separated.")
POSITIONS_HELP = "all, prompt, generated, a list (0,4,-1; negatives count back from the prompt's end) or a slice (2:10)."


# ---- shared by generate ------------------------------------------------------------------------------------------


def intervention_options(command):
    """The --ablate / --steer / --interventions options of commands that run a spliced model."""
    command = click.option("--interventions", "interventions_file", type=click.Path(exists=True, dir_okay=False),
                           help="An intervention spec (JSON, as saved by InterventionSet.save).")(command)
    command = click.option("--steer", "steers", multiple=True, metavar="HEAD=VALUE",
                           help="Clamp a head's activation (HEAD+=V adds, HEAD*=V scales). Repeatable.")(command)
    command = click.option("--ablate", "ablations", multiple=True, metavar="HEADS", help="Zero these heads. " + HEADS_HELP)(command)
    return command


def interventions_from_options(ablations: tuple[str, ...], steers: tuple[str, ...], interventions_file: str | None) -> InterventionSet:
    from lorsa_surgery.interventions.edits import Ablate, InterventionSet, parse_steer

    chosen = InterventionSet.load(interventions_file) if interventions_file else InterventionSet()
    return chosen + InterventionSet([Ablate(h) for h in ablations] + [parse_steer(s) for s in steers])


def require_splice(handle, chosen: InterventionSet) -> None:
    if len(chosen) and handle is None:
        raise LorsaSurgeryError("Interventions act on Lorsa heads: pass --lorsa LAYER=PATH or a patched model.")


# ---- the commands ---------------------------------------------------------------------------------------------------


def _common(command):
    for option in reversed([
        click.argument("model"),
        lorsa_option,
        click.option("--mode", type=click.Choice(["replace", "exact"]), default=None, help="Splice mode (default: replace, or the patched model's)."),
        click.option("--heads", required=True, help=HEADS_HELP),
        click.option("--positions", default="all", show_default=True, help=POSITIONS_HELP),
        click.option("--prompt", "prompts", multiple=True, type=TEXT, help="A prompt to measure on. Repeatable."),
        click.option("--text", "texts", multiple=True, type=click.Path(exists=True, dir_okay=False), help="A text file (.txt or .jsonl) to measure on."),
        click.option("--max-length", default=256, show_default=True, help="Token window for long texts."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table."),
        click.option("--save", "save_dir", type=click.Path(file_okay=False, path_type=Path), help="Write a patched model with the intervention attached."),
        overwrite_option,
        loading_options,
    ]):
        command = option(command)
    return command


def _load(options: dict):
    """(model, tokenizer, splice handle), after checking the head and position syntax (before the slow load)."""
    from lorsa_surgery.interventions.edits import parse_positions
    from lorsa_surgery.interventions.heads import parse_heads
    from lorsa_surgery.io import files

    parse_heads(options["heads"])
    parse_positions(options["positions"])
    if options["save_dir"] is not None:
        files.check_out(options["save_dir"], overwrite=options["overwrite"])
    host, tokenizer, handle = load_with_modules(
        options["model"], options["lorsa_specs"], options["mode"], options["revision"], options["base"], options["allow_pickle"],
        options["placement"], heads=[options["heads"]],
    )
    if handle is None:
        raise LorsaSurgeryError("Interventions act on Lorsa heads: pass --lorsa LAYER=PATH or a patched model.")
    return host, tokenizer, handle




def _report(options: dict, host, tokenizer, handle, chosen: InterventionSet, metric=None) -> None:
    """Measure the set on the prompts / texts (and `metric` on each prompt), print, and save the patched model if asked."""
    from lorsa_surgery.host.models import prompt_ids
    from lorsa_surgery.interventions.patching import effect, forward
    from lorsa_surgery.publishing.patched import save_patched

    inputs, labels = list(options["prompts"]), list(options["prompts"])
    for path in options["texts"]:
        docs = corpus.load_texts([path])
        inputs += docs
        labels += [Path(path).name] if len(docs) == 1 else [f"{Path(path).name}[{i}]" for i in range(len(docs))]
    if not inputs:
        inputs, labels = corpus.load_texts([]), ["built-in sample"]
    rows = effect(handle, tokenizer, inputs, chosen, options["max_length"])
    records = [
        {"input": label, "tokens": r.tokens, "loss_before": r.loss_before, "loss_after": r.loss_after, "kl": r.kl,
         "next_before": tokenizer.decode([r.next_before]), "next_after": tokenizer.decode([r.next_after])}
        for label, r in zip(labels, rows)
    ]
    if metric is not None:
        for record, text in zip(records, inputs):
            ids = prompt_ids(handle.model, tokenizer, text)
            before = float(metric(forward(handle, ids), ids, None).mean())
            with chosen.applied(handle):
                after = float(metric(forward(handle, ids), ids, None).mean())
            record.update(metric=metric.name, metric_before=before, metric_after=after)
    if options["as_json"]:
        click.echo(json.dumps({"interventions": chosen.summary(), "effects": records}, indent=2))
    else:
        click.echo(f"{'input':<32} {'tokens':>6} {'loss':>8} {'after':>8} {'change':>8} {'KL':>8}  next token")
        for r in records:
            label = r["input"] if len(r["input"]) <= 32 else r["input"][:29] + "..."
            click.echo(
                f"{label:<32} {r['tokens']:>6} {r['loss_before']:>8.4f} {r['loss_after']:>8.4f} "
                f"{r['loss_after'] - r['loss_before']:>+8.4f} {r['kl']:>8.4f}  {r['next_before']!r} -> {r['next_after']!r}"
                + (f"  {r['metric']}: {r['metric_before']:.4f} -> {r['metric_after']:.4f}" if "metric" in r else "")
            )
    if options["save_dir"] is not None:
        previous = handle.interventions
        if previous is not None:
            previous.detach()
            chosen = previous + chosen
        chosen.attach(handle)
        save_patched(handle, options["save_dir"], overwrite=options["overwrite"])  # the base the splice records: the true one for patched models too
        if not options["as_json"]:
            click.echo(f"Patched model with the intervention written to {options['save_dir']}")


@click.command()
@_common
@click.option("--how", type=click.Choice(["zero", "mean", "resample"]), default="zero", show_default=True)
@click.option("--reference", "references", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Corpus for mean ablation (.txt or .jsonl; built-in sample if none).")
@click.option("--resample-from", "resample_from", type=TEXT, help="Prompt whose activations resample ablation writes in.")
def ablate(**options) -> None:
    """Ablate HEADS of MODEL (zero, corpus mean, or resampled from another prompt) and show the effect."""
    from lorsa_surgery.analysis.scan import mean_activations
    from lorsa_surgery.host.metrics import token_windows
    from lorsa_surgery.host.models import prompt_ids
    from lorsa_surgery.interventions.edits import Ablate, InterventionSet
    from lorsa_surgery.interventions.patching import cache_run

    host, tokenizer, handle = _load(options)
    record = {"heads": options["heads"], "how": options["how"], "positions": options["positions"]}
    if options["how"] == "mean":
        windows = list(token_windows(tokenizer, corpus.load_texts(list(options["references"])), options["max_length"]))
        record["means"] = mean_activations(handle, windows, options["heads"])
    elif options["how"] == "resample":
        if not options["resample_from"]:
            raise LorsaSurgeryError("Resample ablation needs --resample-from PROMPT.")
        record["source"] = cache_run(handle, prompt_ids(handle.model, tokenizer, options["resample_from"]), options["heads"])
    _report(options, host, tokenizer, handle, InterventionSet([Ablate(**record)]))


@click.command()
@_common
@click.option("--add", type=float, help="Add this to the heads' activations.")
@click.option("--scale", type=float, help="Multiply the heads' activations by this.")
@click.option("--clamp", type=float, help="Set the heads' activations to this.")
def steer(**options) -> None:
    """Steer HEADS of MODEL (add, scale or clamp their activations) and show the effect."""
    from lorsa_surgery.interventions.edits import InterventionSet, Steer

    record = Steer(options["heads"], add=options["add"], scale=options["scale"], clamp=options["clamp"], positions=options["positions"])
    host, tokenizer, handle = _load(options)
    _report(options, host, tokenizer, handle, InterventionSet([record]))


@click.command()
@_common
@click.option("--source", "source_text", required=True, type=TEXT, help="Prompt whose activations are patched in.")
@click.option("--sweep", is_flag=True, help="Instead: sweep every head x position on the first prompt and print a table.")
@click.option("--metric", type=click.Choice(["logit-diff", "probability", "loss"]), default=None,
              help="Also score this on each prompt before and after the patch [default: none; with --sweep, logit-diff].")
@click.option("--token", help="Token (text) scored by logit-diff and probability: it must be one token.")
@click.option("--vs-token", help="The other token of logit-diff.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="With --sweep: also write a PNG heat map.")
@click.option("--top", default=20, show_default=True, type=POSITIVE, help="With --sweep: rows of the table.")
def patch(**options) -> None:
    """Patch HEADS of MODEL from a run on --source and show the effect, or sweep heads x positions (--sweep)."""
    from lorsa_surgery.host.models import prompt_ids
    from lorsa_surgery.interventions.edits import InterventionSet, Patch
    from lorsa_surgery.interventions.patching import cache_run

    host, tokenizer, handle = _load(options)
    source = cache_run(handle, prompt_ids(handle.model, tokenizer, options["source_text"]), options["heads"])
    if not options["sweep"]:
        metric = _metric(options, tokenizer) if options["metric"] or options["token"] else None
        _report(options, host, tokenizer, handle, InterventionSet([Patch(options["heads"], source, options["positions"])]), metric)
        return
    _sweep(options, tokenizer, handle, source)


def _single_token(tokenizer, text: str | None, option: str) -> int:
    if text is None:
        raise LorsaSurgeryError(f"This metric needs {option}.")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise LorsaSurgeryError(f"{option} {text!r} is {len(ids)} tokens; give text that is exactly one token.")
    return ids[0]


def _metric(options: dict, tokenizer):
    """The metric the options name, scored on the next-token prediction of each prompt."""
    from lorsa_surgery.interventions.patching import Loss, LogitDiff, Probability

    if options["metric"] == "loss":
        return Loss()  # mean next-token loss of each prompt
    if options["metric"] == "probability":
        return Probability(_single_token(tokenizer, options["token"], "--token"))
    return LogitDiff(_single_token(tokenizer, options["token"], "--token"), _single_token(tokenizer, options["vs_token"], "--vs-token"))


def _sweep(options: dict, tokenizer, handle, source) -> None:
    from lorsa_surgery.analysis.attribution import token_text
    from lorsa_surgery.analysis.plots import plot_sweep
    from lorsa_surgery.host.models import prompt_ids
    from lorsa_surgery.interventions.edits import parse_positions
    from lorsa_surgery.interventions.patching import cache_run, sweep

    if not options["prompts"]:
        raise LorsaSurgeryError("A sweep needs --prompt (the run that is patched).")
    metric = _metric(options, tokenizer)
    positions = parse_positions(options["positions"])
    if not isinstance(positions, list) and positions != "all":
        raise LorsaSurgeryError("A sweep takes --positions all or a list of absolute positions.")
    ids = prompt_ids(handle.model, tokenizer, options["prompts"][0])
    if not len(source.values) and not len(cache_run(handle, ids, options["heads"]).values):
        click.echo("Warning: the swept heads fire on neither prompt; patching them changes nothing, so every entry is the "
                   "baseline.", err=True)
    result = sweep(handle, ids, options["heads"], metric, source=source, positions=None if positions == "all" else positions)
    texts = [token_text(tokenizer, int(ids[0, p])) for p in result.positions]
    if options["plot"] is not None:
        plot_sweep(result, options["plot"], position_labels=texts)
    if options["as_json"]:
        click.echo(json.dumps({**result.to_dict(), "position_tokens": texts}, indent=2))
        return
    click.echo(f"{result.metric}: baseline {result.baseline:.4f}; the {options['top']} largest changes")
    click.echo(f"{'head':<28} {'position':>8} {'token':<14} {'value':>10} {'change':>10}")
    for name, position, value in result.top(options["top"]):
        token = repr(texts[result.positions.index(position)])
        click.echo(f"{name:<28} {position:>8} {token[:14]:<14} {value:>10.4f} {value - result.baseline:>+10.4f}")

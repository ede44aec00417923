"""`lorsa-surgery heads top|zpattern|dashboard|label`: look at Lorsa heads and name them."""

import json
from pathlib import Path

import click

from lorsa_surgery import Lorsa, corpus
from lorsa_surgery.cli.heads import heads
from lorsa_surgery.cli.loading import load_with_modules, placement_options
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.heads import HeadRef, parse_heads


def _model_options(command):
    for option in reversed([
        click.argument("model"),
        click.option("--lorsa", "lorsa_specs", multiple=True, metavar="LAYER=PATH",
                     help="The Lorsa module of a layer, as in `replace`. Repeatable."),
        click.option("--revision", default=None, help="Hub revision of MODEL."),
        click.option("--base", default=None, help="Base model override for a patched model."),
        click.option("--allow-pickle", is_flag=True, help="Allow paper-era final.pth pickles (trusted sources only)."),
        placement_options,
    ]):
        command = option(command)
    return command


def _corpus_options(command):
    for option in reversed([
        click.option("--text", "texts", multiple=True, type=click.Path(exists=True, dir_okay=False),
                     help="Corpus (.txt or .jsonl); the built-in sample if none."),
        click.option("--max-length", default=128, show_default=True, help="Token window."),
        click.option("-k", "--k", "k", default=10, show_default=True, help="Top activations per head."),
    ]):
        command = option(command)
    return command


def _load(model, lorsa_specs, revision, base, allow_pickle, placement):
    host, tokenizer, handle = load_with_modules(model, lorsa_specs, None, revision, base, allow_pickle, placement)
    if handle is None:
        raise LorsaSurgeryError("Heads live in Lorsa modules: pass --lorsa LAYER=PATH or a patched model.")
    return tokenizer, handle


def _windows(tokenizer, texts, max_length):
    from lorsa_surgery.metrics import token_windows

    return list(token_windows(tokenizer, corpus.load_texts(list(texts)), max_length))


@heads.command()
@_model_options
@click.argument("head_spec", metavar="HEADS")
@_corpus_options
@click.option("--context", default="12,4", show_default=True, help="Tokens shown before,after each top activation.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def top(model, lorsa_specs, revision, base, allow_pickle, placement, head_spec, texts, max_length, k, context, as_json):
    """Firing statistics and top activations of HEADS over a corpus."""
    from lorsa_surgery.analysis import scan_heads, token_text

    parse_heads(head_spec)
    try:
        before, after = (int(n) for n in context.split(","))
    except ValueError:
        raise LorsaSurgeryError(f"--context {context!r} is not BEFORE,AFTER.") from None
    tokenizer, handle = _load(model, lorsa_specs, revision, base, allow_pickle, placement)
    scans = scan_heads(handle, _windows(tokenizer, texts, max_length), head_spec, k=k, context=(before, after))
    if as_json:
        click.echo(json.dumps({
            ref: {"name": s.name, "stats": {**vars(s.stats), "frequency": s.stats.frequency},
                  "top": [{**vars(t), "text": [tokenizer.decode([i]) for i in t.tokens]} for t in s.top]}
            for ref, s in scans.items()
        }, indent=2))
        return
    for scan in scans.values():
        st = scan.stats
        click.echo(f"{scan.name}: fires on {100 * st.frequency:.2f}% of {st.tokens} tokens, mean {st.mean:.4g}, "
                   f"mean when firing {st.mean_when_fired:.4g}, max {st.max:.4g}")
        for t in scan.top:
            text = "".join(f"[[{token_text(tokenizer, i)}]]" if j == t.focus else token_text(tokenizer, i) for j, i in enumerate(t.tokens))
            click.echo(f"  {t.value:>9.4g}  {text}")


@heads.command()
@_model_options
@click.argument("head_spec", metavar="HEAD")
@click.option("--prompt", required=True, help="The text to look at.")
@click.option("--position", default=-1, show_default=True, help="Token (column) whose z-pattern is shown; negative counts from the end.")
@click.option("--top", "n_top", default=10, show_default=True, help="Source tokens listed.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Also write a PNG bar chart.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def zpattern(model, lorsa_specs, revision, base, allow_pickle, placement, head_spec, prompt, position, n_top, plot, as_json):
    """Which source tokens of PROMPT feed HEAD at one token, and how much."""
    from lorsa_surgery.analysis import plot_z_pattern, token_text, z_pattern

    parse_heads(head_spec)
    tokenizer, handle = _load(model, lorsa_specs, revision, base, allow_pickle, placement)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    zp = z_pattern(handle, head_spec, ids, position)
    parts = zp.contributions[0]
    order = parts.abs().argsort(descending=True)[:n_top].tolist()
    if plot is not None:
        plot_z_pattern(zp, tokenizer, plot)
    if as_json:
        click.echo(json.dumps({
            "head": zp.head, "name": zp.name, "position": zp.positions[0], "z": float(zp.z[0]),
            "activation": float(zp.activation[0]),
            "sources": [{"position": s, "token": tokenizer.decode([int(ids[0, s])]), "contribution": float(parts[s])} for s in order],
        }, indent=2))
        return
    at = zp.positions[0]
    click.echo(f"{zp.name} at position {at} ({token_text(tokenizer, int(ids[0, at]))!r}): "
               f"z = {float(zp.z[0]):.4g}, activation {float(zp.activation[0]):.4g}")
    for s in order:
        click.echo(f"  {s:>5}  {token_text(tokenizer, int(ids[0, s]))!r:<20} {float(parts[s]):>+10.4g}")


@heads.command()
@_model_options
@click.argument("head_spec", metavar="HEADS")
@_corpus_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the dashboards.")
def dashboard(model, lorsa_specs, revision, base, allow_pickle, placement, head_spec, texts, max_length, k, out_dir):
    """Write a self-contained HTML dashboard (and a logit-attribution PNG) per head of HEADS."""
    from lorsa_surgery.analysis import dashboard as write_dashboard
    from lorsa_surgery.analysis import logit_attribution, plot_logit_attribution
    from lorsa_surgery.heads import resolve_heads

    parse_heads(head_spec)
    tokenizer, handle = _load(model, lorsa_specs, revision, base, allow_pickle, placement)
    windows = _windows(tokenizer, texts, max_length)
    for ref in resolve_heads(head_spec, handle):
        page = write_dashboard(handle, tokenizer, ref, windows, out_dir / f"{ref}.html", k=k)
        plot_logit_attribution(logit_attribution(handle, ref), tokenizer, out_dir / f"{ref}-logits.png")
        click.echo(page)


@heads.command("label")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("head_spec", metavar="HEAD")
@click.argument("label")
@click.option("--note", default=None, help="A longer note shown in dashboards and model cards.")
def label_head(path, head_spec, label, note):
    """Label HEAD (L3.H5) in the head catalog of a native Lorsa folder or a patched-model folder at PATH.

    An empty LABEL removes the head from the catalog.
    """
    from lorsa_surgery.formats import NATIVE_CONFIG
    from lorsa_surgery.patched import is_patched_folder, read_root

    ref = HeadRef.parse(head_spec)
    layer, index = ref.layer, ref.index
    folder = path
    if is_patched_folder(path):
        entry = read_root(path)["layers"].get(str(layer))
        if entry is None:
            raise LorsaSurgeryError(f"Layer {layer} carries no Lorsa module in {path}.")
        folder = path / entry["folder"]
    if not (folder / NATIVE_CONFIG).is_file():
        raise LorsaSurgeryError(f"{folder} is not a native Lorsa folder; only those carry a head catalog.")
    lorsa = Lorsa.from_pretrained(folder)
    if lorsa.cfg.host_layer is not None and lorsa.cfg.host_layer != layer:
        raise LorsaSurgeryError(f"The module in {folder} is for layer {lorsa.cfg.host_layer}, not {layer}.")
    if index >= lorsa.cfg.n_ov_heads:
        raise LorsaSurgeryError(f"Unknown head {head_spec}: the module has {lorsa.cfg.n_ov_heads} heads.")
    if label:
        lorsa.catalog[index] = {"label": label, "note": note if note is not None else lorsa.catalog.get(index, {}).get("note", "")}
    else:
        lorsa.catalog.pop(index, None)
    lorsa.save_pretrained(folder)
    click.echo(f"{head_spec}: {label!r}" if label else f"{head_spec}: label removed")

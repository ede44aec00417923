"""`lorsa-surgery heads top|zpattern|dashboard|label`: look at Lorsa heads and name them."""

import json
from pathlib import Path

import click

from lorsa_surgery.analysis.names import BEHAVIOURS, FAMILY_NAMES, WORDS
from lorsa_surgery.cli.heads import heads
from lorsa_surgery.cli.loading import (PLACEMENT, POSITIVE, TEXT, Finite, load_with_modules, loading_options, lorsa_option,
                                        parse_layer_specs, placement_options)
from lorsa_surgery.errors import LorsaSurgeryError


def _model_options(command):
    return click.argument("model")(lorsa_option(loading_options(command)))


def _load(model, lorsa_specs, revision, base, allow_pickle, placement, heads=()):
    host, tokenizer, handle = load_with_modules(model, lorsa_specs, None, revision, base, allow_pickle, placement, heads=heads)
    if handle is None:
        raise LorsaSurgeryError("Heads live in Lorsa modules: pass --lorsa LAYER=PATH or a patched model.")
    return tokenizer, handle


@heads.command()
@_model_options
@click.argument("head_spec", metavar="HEAD")
@click.option("--prompt", required=True, type=TEXT, help="The text to look at.")
@click.option("--position", default=-1, show_default=True, help="Token (column) whose z-pattern is shown; negative counts from the end.")
@click.option("--top", "n_top", default=10, show_default=True, type=POSITIVE, help="Source tokens listed.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Also write a PNG bar chart.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def zpattern(model, lorsa_specs, revision, base, allow_pickle, placement, head_spec, prompt, position, n_top, plot, as_json):
    """Which source tokens of PROMPT feed HEAD at one token, and how much."""
    from lorsa_surgery.analysis.attribution import token_text, z_pattern
    from lorsa_surgery.analysis.plots import plot_z_pattern
    from lorsa_surgery.host.models import prompt_ids

    tokenizer, handle = _load(model, lorsa_specs, revision, base, allow_pickle, placement, heads=[head_spec])
    ids = prompt_ids(handle.model, tokenizer, prompt)
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


@heads.command("label")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("head_spec", metavar="HEAD")
@click.argument("label")
@click.option("--note", default=None, help="A longer note shown in dashboards and model cards.")
def label_head(path, head_spec, label, note):
    """Label HEAD (L3.H5) in the head catalog of a native Lorsa folder or a patched-model folder at PATH.

    An empty LABEL removes the head from the catalog.
    """
    from lorsa_surgery.interventions.heads import HeadRef
    from lorsa_surgery.lorsa.formats import NATIVE_CONFIG, save_catalog
    from lorsa_surgery.lorsa.model import Lorsa
    from lorsa_surgery.publishing.patched import is_patched_folder, module_folders

    ref = HeadRef.parse(head_spec)
    layer, index = ref.layer, ref.index
    folder = path
    if is_patched_folder(path):
        folder = module_folders(path).get(layer)
        if folder is None:
            raise LorsaSurgeryError(f"Layer {layer} carries no Lorsa module in {path}.")
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
    save_catalog(lorsa, folder)
    click.echo(f"{head_spec}: {label!r}" if label else f"{head_spec}: label removed")


# ---- one scan, many views ---------------------------------------------------------------------------------------

SCAN_FILE = "scan.json"
TOKENIZER_FOLDER = "tokenizer"


def _stores(folder: Path):
    """(record, the layer stores) of a scan folder, wherever it has been moved or copied."""
    from lorsa_surgery.analysis.export import read_scan

    scan = read_scan(folder, tokenizer=False)
    return scan.record, scan.stores


def _tokenizer(folder: Path):
    """The tokenizer a scan saved beside its stores (read from the scan folder, so a moved scan still finds it)."""
    from lorsa_surgery.analysis.export import scan_tokenizer

    return scan_tokenizer(folder)


@heads.command("scan")
@_model_options
@click.option("--text", "texts", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Corpus (.txt or .jsonl); none: the built-in offline corpus, the Python documentation.")
@click.option("--max-length", default=128, show_default=True, help="Tokens per window (windows start at document starts).")
@click.option("--max-tokens", default=65536, show_default=True, help="Tokens to scan, from documents in a seeded order.")
@click.option("-k", "--k", "k", default=10, show_default=True, help="Strongest examples kept per head.")
@click.option("--bands", default=5, show_default=True, help="Quantile bands of each head's activations to show examples from.")
@click.option("--per-band", default=2, show_default=True, help="Examples per quantile band.")
@click.option("--pages/--no-pages", default=True, show_default=True, help="Also write index.html and a page per head.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the scan and pages.")
def scan_command(model, lorsa_specs, revision, base, allow_pickle, placement, texts, max_length, max_tokens, k, bands, per_band,
                 pages, out_dir):
    """Scan a corpus once through every spliced layer of MODEL and keep what every head view shows (heads list, top,
    dashboard, index.html); an unchanged module and corpus are not scanned again."""
    from lorsa_surgery.analysis.pages import write_site
    from lorsa_surgery.analysis.scan import corpus_windows, ensure
    from lorsa_surgery.host import corpus
    from lorsa_surgery.io import files

    if min(max_length, max_tokens, bands, per_band + 1, k + 1) < 1 or max_length < 2:
        raise LorsaSurgeryError("--max-length must be at least 2, --max-tokens and --bands positive, -k and --per-band not negative.")
    files.claim(out_dir, kind="head-scan")  # before the model loads: a folder of someone else's is refused at once
    tokenizer, handle = _load(model, lorsa_specs, revision, base, allow_pickle, placement)
    windows = corpus_windows(tokenizer, texts, max_length, max_tokens)
    stores = []
    for layer in handle.layers:
        store, scanned = ensure(handle, windows, layer, out_dir / f"L{layer}", k=k, bands=bands, per_band=per_band)
        click.echo(f"layer {layer}: {'scanned' if scanned else 'unchanged, kept'} {store.n_tokens} tokens, {len(store.heads)} heads", err=True)
        stores.append(store)
    tokenizer.save_pretrained(out_dir / TOKENIZER_FOLDER)
    files.write_json(out_dir / SCAN_FILE, {
        "model": model, "lorsa": list(lorsa_specs), "revision": revision, "base": base, "layers": handle.layers,
        "tokenizer": TOKENIZER_FOLDER, "corpus": [Path(t).name for t in texts] or corpus.BUILTIN_CORPUS,
    })
    if pages:
        click.echo(write_site(stores, tokenizer, out_dir))


@heads.command("list")
@click.argument("scan_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--label", default=None, help="Only heads with this catalog label.")
@click.option("--min-firing", type=Finite(0, 1), default=0.0, show_default=True, help="Only heads firing on at least this fraction of tokens.")
@click.option("--fires-on", "prompt", default=None, type=TEXT, help="Only heads that fire somewhere on this prompt (loads the model).")
@click.option("--sort", type=click.Choice(["head", "firing", "mean", "max"]), default="head", show_default=True)
@click.option("--limit", type=POSITIVE, default=None, help="At most this many rows.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_heads(scan_dir, label, min_firing, prompt, sort, limit, as_json):
    """The heads of a scan (`heads scan --out SCAN_DIR`): label, firing rate, mean and max activation, dead flag,
    QK group and the tokens each promotes most."""
    from lorsa_surgery.analysis.attribution import token_text

    record, stores = _stores(scan_dir)
    tokenizer = _tokenizer(scan_dir)
    rows = [{**row, "layer": store.layer} for store in stores for row in store.rows()]
    if label is not None:
        rows = [r for r in rows if r["label"] == label]
    rows = [r for r in rows if r["firing_rate"] >= min_firing]
    if prompt is not None:
        firing = _firing_on(record, prompt)
        rows = [r for r in rows if r["head"] in firing]
    keys = {"head": lambda r: (r["layer"], r["index"]), "firing": lambda r: -r["firing_rate"], "mean": lambda r: -r["mean"],
            "max": lambda r: -r["max"]}
    rows = sorted(rows, key=keys[sort])[:limit]
    for r in rows:
        r["promoted_text"] = [token_text(tokenizer, t) for t in r["promoted"][:5]]
    if as_json:
        click.echo(json.dumps([{k: v for k, v in r.items() if k != "promoted"} for r in rows], indent=2))
        return
    click.echo(f"{'head':<12} {'label':<16} {'firing %':>9} {'mean':>9} {'max':>9} {'dead':>4} {'QK':>3}  promotes")
    for r in rows:
        click.echo(f"{r['head']:<12} {r['label'][:16]:<16} {100 * r['firing_rate']:>9.3f} {r['mean']:>9.4g} {r['max']:>9.4g} "
                   f"{'dead' if r['dead'] else '':>4} {r['qk_group']:>3}  {' '.join(repr(t) for t in r['promoted_text'][:3])}")


def _firing_on(record: dict, prompt: str) -> set[str]:
    """Heads (refs) that fire at any token of the prompt, in the scanned model."""
    import torch

    from lorsa_surgery.host.models import prompt_ids
    from lorsa_surgery.interventions.edits import Recorder

    placement = {**dict.fromkeys(PLACEMENT), "dtype": "float32"}  # the defaults of the placement options
    tokenizer, handle = _load(record["model"], tuple(record["lorsa"]), record["revision"], record["base"], False, placement)
    refs = [f"L{layer}.H0-{handle[layer].source.cfg.n_ov_heads - 1}" for layer in handle.layers]
    with Recorder(handle, refs) as rec, torch.no_grad():
        handle.model(prompt_ids(handle.model, tokenizer, prompt))
    fired = (rec.activations() != 0).any(1)[0]
    return {str(rec.refs[i]) for i in fired.nonzero()[:, 0].tolist()}


@heads.command("top")
@click.argument("scan_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("head_spec", metavar="HEADS")
@click.option("--context", default="12,4", show_default=True, help="Tokens shown before,after each example.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def top(scan_dir, head_spec, context, as_json):
    """Firing statistics and strongest activations of HEADS (L3.H5, L3.H0-9, L3:label) in a scan."""
    from lorsa_surgery.analysis.attribution import token_text

    before, after = _context(context)
    record, stores = _stores(scan_dir)
    tokenizer = _tokenizer(scan_dir)
    out, rows = {}, {store.layer: store.rows() for store in stores}
    for store, column in _columns(stores, head_spec):
        row = rows[store.layer][column]
        examples = []
        for ex in store.examples(column):
            if ex["kind"]:
                continue
            ids = store.window(ex["window"]).tolist()
            lo, hi = max(0, ex["position"] - before), min(len(ids), ex["position"] + after + 1)
            examples.append({"value": ex["value"], "doc": ex["doc"], "offset": ex["offset"], "window": ex["window"],
                             "position": ex["position"], "tokens": ids[lo:hi], "focus": ex["position"] - lo,
                             "text": [token_text(tokenizer, i) for i in ids[lo:hi]]})
        out[row["head"]] = {"name": row["name"], "stats": {k: row[k] for k in ("fired", "firing_rate", "mean", "mean_when_fired", "max", "dead")}
                            | {"tokens": store.n_tokens}, "top": examples}
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for head in out.values():
        st = head["stats"]
        click.echo(f"{head['name']}: fires on {100 * st['firing_rate']:.2f}% of {st['tokens']} tokens, mean {st['mean']:.4g}, "
                   f"mean when firing {st['mean_when_fired']:.4g}, max {st['max']:.4g}")
        for ex in head["top"]:
            text = "".join(f"[[{t}]]" if j == ex["focus"] else t for j, t in enumerate(ex["text"]))
            click.echo(f"  {ex['value']:>9.4g}  doc {ex['doc']} @{ex['offset']}: {text}")


@heads.command("dashboard")
@click.argument("scan_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("head_spec", metavar="HEADS")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the pages [default: SCAN_DIR, beside its index.html].")
def dashboard(scan_dir, head_spec, out_dir):
    """Write the pages of HEADS from a scan (and the index that links them); print the index's path."""
    from lorsa_surgery.analysis.pages import write_site

    record, stores = _stores(scan_dir)
    refs = [store.rows()[column]["head"] for store, column in _columns(stores, head_spec)]
    click.echo(write_site(stores, _tokenizer(scan_dir), out_dir or scan_dir, heads=refs))


def _context(text: str) -> tuple[int, int]:
    try:
        before, after = (int(n) for n in text.split(","))
    except ValueError:
        raise LorsaSurgeryError(f"--context {text!r} is not BEFORE,AFTER.") from None
    return before, after


def _columns(stores, head_spec: str):
    """(store, column) of each head a spec names, labels read from the scanned catalog."""
    from lorsa_surgery.interventions.heads import resolve_in

    by_layer = {store.layer: store for store in stores}

    def module(layer: int):
        if layer not in by_layer:
            raise LorsaSurgeryError(f"Layer {layer} was not scanned (the scan covers layers {sorted(by_layer)}).")
        store = by_layer[layer]
        catalog = {int(h): {"label": label} for h, label in zip(store.heads.tolist(), store.labels) if label}
        return store.n_heads, catalog

    return [(by_layer[ref.layer], by_layer[ref.layer].column(ref.index)) for ref in resolve_in(head_spec, module)]


# ---- head families -------------------------------------------------------------------------------------------


@heads.command("detect")
@click.argument("model")
@click.option("--lorsa", "lorsa_specs", multiple=True, metavar="LAYER=PATH",
              help="Score the heads of this Lorsa module (folder, Hub id, 'default' or 'from-attention'). Repeatable.")
@click.option("--layer", "mhsa_layers", multiple=True, type=int, help="Score the MHSA heads of this layer. Repeatable.")
@click.option("--families", default=None, help="Comma-separated families [default: all]: " + ", ".join(FAMILY_NAMES) + ".")
@click.option("-n", "--prompts", "n", default=16, show_default=True, help="Prompts per probe (IOI and arithmetic: 4x).")
@click.option("--top", "n_top", default=5, show_default=True, type=POSITIVE, help="Heads listed per family.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: every head's score per family.")
@click.option("--write-catalog", is_flag=True,
              help="Label the heads that reach a family's threshold in each module's head catalog (its folder), so "
                   "`L23:induction` names them and model cards list them; heads that only read like a family are "
                   "labelled `<family>_attention`.")
@click.option("--revision", default=None, help="Hub revision of MODEL.")
@click.option("--allow-pickle", is_flag=True, help="Allow paper-era final.pth pickles (trusted sources only).")
@placement_options
def detect(model, lorsa_specs, mhsa_layers, families, n, n_top, seed, as_json, write_catalog, revision, allow_pickle,
           placement):
    """Find head families (induction, previous-token, sink, successor, name mover, arithmetic, thematic anchor)
    among the heads of Lorsa modules and of MHSA layers of MODEL, on probes built offline from its tokenizer."""
    from lorsa_surgery.cli.loading import load_host
    from lorsa_surgery.host.arch import provenance
    from lorsa_surgery.analysis.families import ATTENTION_THRESHOLD, catalog_entries, detect as run_detect
    from lorsa_surgery.lorsa.formats import NATIVE_CONFIG, save_catalog

    names = families.split(",") if families else list(FAMILY_NAMES)
    unknown = [f for f in names if f not in FAMILY_NAMES]
    if unknown:
        raise LorsaSurgeryError(f"Unknown head families: {', '.join(unknown)} (known: {', '.join(FAMILY_NAMES)}).")
    specs = parse_layer_specs(lorsa_specs, model, revision)
    if not specs and not mhsa_layers:
        raise LorsaSurgeryError("Name what to score: --lorsa LAYER=PATH for a module's heads, --layer L for MHSA heads.")
    host, tokenizer, modules = load_host(model, specs, revision, allow_pickle, placement)
    targets = [(layer, modules[layer], f"L{layer}.H") for layer in sorted(modules)]
    targets += [(layer, None, f"L{layer}.A") for layer in mhsa_layers]
    report, spread = [], {}
    for layer, lorsa, prefix in targets:
        results = run_detect(host, tokenizer, layer, lorsa, names, n_prompts=n, seed=seed)
        report.append((layer, lorsa, prefix, results))
        if lorsa is not None:
            spread[layer] = provenance(host, layer, lorsa)["output"]
        if write_catalog and lorsa is not None:
            folder = Path(lorsa.origin.get("path", ""))
            if not (folder / NATIVE_CONFIG).is_file():
                raise LorsaSurgeryError(f"Layer {layer}'s module is not a native Lorsa folder; only those carry a head catalog.")
            lorsa.catalog = {**{h: e for h, e in lorsa.catalog.items() if not e.get("note", "").startswith("detected:")},
                             **catalog_entries(results)}
            save_catalog(lorsa, folder)
    if as_json:
        click.echo(json.dumps({f"{prefix[:-2]}": {
            **{name: {"threshold": fs.threshold, "queries": fs.queries, "members": [f"{prefix}{h}" for h in fs.members()],
                      "attending": [f"{prefix}{h}" for h in fs.attending()],
                      "scores": [round(float(s), 4) for s in fs.scores],
                      "attention": [round(float(s), 4) for s in fs.attention], "counted": fs.counted.tolist()}
               for name, fs in results.items()},
            **({"provenance": {"main_mhsa_head": spread[layer].argmax(1).tolist(),
                               "main_share": [round(float(v), 4) for v in spread[layer].max(1).values]}}
               if layer in spread and lorsa is not None else {}),
        } for layer, lorsa, prefix, results in report}, indent=2))
        return
    for layer, lorsa, prefix, results in report:
        kind = f"Lorsa module, {lorsa.cfg.n_ov_heads} heads" if lorsa is not None else "MHSA heads"
        click.echo(f"layer {layer} ({kind})")
        click.echo(f"  {'family':<17}{'threshold':>10}{'members':>9}{'attending':>11}  top heads (score)")
        for name, fs in results.items():
            top = fs.scores.argsort(descending=True)[:n_top].tolist()
            shown = ", ".join(f"{prefix}{h} {float(fs.scores[h]):.2f}" for h in top if fs.scores[h] > 0) or "-"
            click.echo(f"  {name:<17}{fs.threshold:>10.2f}{len(fs.members()):>9}{len(fs.attending()):>11}  {shown}")
        if lorsa is not None:
            top = spread[layer].max(1).values
            click.echo(f"  provenance: the main MHSA head holds a median {float(top.median()):.2f} of a head's output "
                       f"direction; {float((top < 0.9).float().mean()):.1%} of heads draw on more than one MHSA head "
                       f"(main share under 0.9), {float((top < 0.5).float().mean()):.1%} on no single one (under 0.5)")
        click.echo(f"  attending: heads under the threshold whose attention part reaches {ATTENTION_THRESHOLD} (they read "
                   "the target of a copying family without promoting it directly)")
        if write_catalog and lorsa is not None:
            click.echo(f"  labelled {len(catalog_entries(results))} heads in {lorsa.origin['path']}")


@heads.command("causal")
@_model_options
@click.option("--family", type=click.Choice(list(BEHAVIOURS)), required=True)
@click.option("--heads", "head_spec", default=None,
              help="The family's heads (`L23:induction`, `L23.H5,L23.H9`) [default: the family's label in the catalog].")
@click.option("-n", "--prompts", "n", default=32, show_default=True, help="Prompts (fresh ones, not the detector's).")
@click.option("--seed", default=0, show_default=True)
@click.option("--words", type=click.Choice(WORDS), default="random", show_default=True,
              help="Induction prompts: random words, or the words the family's heads promote.")
@click.option("--also-ablate", "also_spec", default="",
              help="Heads of other spliced layers ablated in every run, the clean one included (`L18.A6-7`: MHSA heads "
                   "6 and 7 through an exact copy, `--lorsa 18=from-attention`), to measure the family without them.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def causal(model, lorsa_specs, revision, base, allow_pickle, placement, family, head_spec, n, seed, words, also_spec,
           as_json):
    """Ablate a family's heads and measure its behaviour against a matched random control (95% intervals over
    prompts), then patch the heads back."""
    import dataclasses

    from lorsa_surgery.analysis.causal import causal_check
    from lorsa_surgery.interventions.heads import by_layer, resolve_heads

    specs = parse_layer_specs(lorsa_specs, model, revision) if lorsa_specs else {}
    spec = head_spec or ",".join(f"L{layer}:{family}" for layer in specs)
    if not spec:
        raise LorsaSurgeryError("Name the heads with --heads, or pass --lorsa so the family's catalog label names them.")
    also = [s for s in also_spec.split(",") if s.strip()]
    tokenizer, handle = _load(model, lorsa_specs, revision, base, allow_pickle, placement, heads=spec.split(",") + also)
    groups = by_layer(resolve_heads(spec.split(","), handle))
    if len(groups) != 1:
        raise LorsaSurgeryError("A causal check ablates heads of one layer at a time.")
    (layer, heads), = groups.items()
    check = causal_check(handle, tokenizer, layer, family, heads, n_prompts=n, seed=seed, words=words, also_ablate=also)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(check), indent=2))
        return
    click.echo(f"{family}: {check.behaviour}; {len(check.heads)} heads of layer {layer}, {check.prompts} prompts, mean [95% CI]"
               + (f"; ablated throughout: {', '.join(check.also_ablated)}" if also else ""))
    for label, value in (("clean", check.clean), ("family ablated", check.ablated),
                         ("matched random heads ablated", check.control_ablated),
                         ("family ablated, patched back", check.restored), ("effect of the family", check.effect),
                         ("effect of the control", check.control_effect)):
        click.echo(f"  {label:<30}{value}")
    readers = [] if head_spec else [h for h, e in handle[layer].source.catalog.items()
                                    if e.get("label") == f"{family}_attention"]
    if readers:
        click.echo(f"The catalog also labels {len(readers)} heads {family}_attention: they read the token the family "
                   f"copies without promoting it directly (--heads L{layer}:{family}_attention).")

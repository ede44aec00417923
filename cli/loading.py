"""Loading what a command runs on: a host model and its --lorsa modules, or a patched model, placed and typed as
the placement options say. Shared by every command that loads a model."""

import functools
import json
from pathlib import Path

import click

from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.host.settings import DTYPE_NAMES, parse_max_memory

LORSA_HELP = ("LAYER=PATH: a checkpoint folder, Hub id (repo or repo:subfolder), 'default' or 'from-attention'; "
              "all=FOLDER (a module per layer, as a training run keeps them), all=default (the modules of the shipped "
              "complete replacement) or all=from-attention for every layer, which LAYER=PATH options then override. "
              "Repeatable.")


def parse_layer_specs(values: tuple[str, ...], model: str | None = None, revision: str | None = None) -> dict[int, str]:
    """{layer: spec} from --lorsa options; `all=SPEC` is spread over every attention layer of `model` (its config is
    read, not its weights), and a layer given by number as well takes its own spec."""
    specs: dict[int, str] = {}
    every = None
    for value in values:
        layer, sep, spec = value.partition("=")
        layer = layer.strip()
        if sep and layer == "all" and spec and every is None:
            every = spec
            continue
        if not sep or not (layer.isascii() and layer.isdecimal()) or not spec:
            raise click.BadParameter(f"{value!r} is not LAYER=PATH (or all=PATH, once).", param_hint="--lorsa")
        if int(layer) in specs:  # keeping the last one would silently drop a module the user asked for
            raise click.BadParameter(f"layer {int(layer)} is given twice ({specs[int(layer)]} and {spec}).", param_hint="--lorsa")
        specs[int(layer)] = spec
    if every is None:
        return specs
    from lorsa_surgery.host.models import load_config
    from lorsa_surgery.publishing.patched import every_layer

    if model is None:
        raise click.BadParameter("all=... needs the model, to know its layers.", param_hint="--lorsa")
    n_layers = load_config(model, revision).get_text_config(decoder=True).num_hidden_layers
    return {**every_layer(every, n_layers), **specs}


class Text(click.ParamType):
    """A prompt: any text with something in it (an empty prompt has nothing to measure)."""

    name = "text"

    def convert(self, value, param, ctx):
        if not str(value).strip():
            self.fail("is empty.", param, ctx)
        return str(value)


class Finite(click.FloatRange):
    """A float in range that is a number (click lets nan through every range and inf through open ones)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if number != number or number in (float("inf"), float("-inf")):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return number


TEXT = Text()
POSITIVE = click.IntRange(min=1)


OVERWRITE_HELP = "Replace the output folder if lorsa-surgery wrote it (a folder of anything else is never replaced)."
overwrite_option = click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)


PLACEMENT = ("dtype", "lorsa_dtype", "device_map", "max_memory", "offload_dir")


def placement_options(command):
    """--dtype, --lorsa-dtype, --device-map, --max-memory and --offload-dir, checked before anything loads and
    handed to the command as one `placement` dict (the keyword arguments of `load_model` and `load_patched`)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        chosen = {name: kwargs.pop(name) for name in PLACEMENT}
        parse_max_memory(chosen["max_memory"])
        device_map = chosen["device_map"]
        if device_map is not None and device_map.lstrip().startswith("{"):
            try:
                chosen["device_map"] = json.loads(device_map)
            except json.JSONDecodeError as e:
                raise click.BadParameter(f"not JSON ({e.msg})", param_hint="--device-map") from None
        return command(*args, placement=chosen, **kwargs)

    dtypes = click.Choice(list(DTYPE_NAMES))
    for option in reversed([
        click.option("--dtype", type=dtypes, default="float32", show_default=True, help="dtype the host model loads in."),
        click.option("--lorsa-dtype", type=dtypes, default=None, help="dtype the Lorsa modules compute in [default: the host's]."),
        click.option("--device-map", default=None,
                     help="Place the host with Accelerate: auto, balanced, sequential, cpu, ... or a JSON map, as in "
                          "transformers; an automatic map counts the Lorsa modules on their layers."),
        click.option("--max-memory", default=None, metavar="DEV=SIZE,...",
                     help="Memory per device, e.g. 0=20GiB,cpu=60GiB (implies --device-map auto)."),
        click.option("--offload-dir", type=click.Path(file_okay=False), default=None, help="Folder for weights offloaded to disk."),
    ]):
        run = option(run)
    return run


lorsa_option = click.option("--lorsa", "lorsa_specs", multiple=True, metavar="LAYER=PATH",
                            help="The Lorsa module of a layer, as in `replace`. Repeatable.")


def loading_options(command):
    """--revision, --base, --allow-pickle and the placement options: how MODEL loads, a host with its --lorsa modules
    or a patched model (`load_with_modules`)."""
    for option in reversed([
        click.option("--revision", default=None, help="Hub revision of MODEL."),
        click.option("--base", default=None, help="Base model override for a patched model."),
        click.option("--allow-pickle", is_flag=True, help="Allow paper-era final.pth pickles (trusted sources only)."),
        placement_options,
    ]):
        command = option(command)
    return command


def load_host(model_spec: str, specs: dict[int, str], revision: str | None, allow_pickle: bool, placement: dict):
    """(model, tokenizer, {layer: Lorsa}) for a plain model and its --lorsa modules. Checkpoints are read first, so a
    bad one fails before the slow host load and an automatic device map counts them; exact copies
    (from-attention) are sized on the empty host and made from the loaded one."""
    from lorsa_surgery.host import models
    from lorsa_surgery.publishing.patched import module_for

    modules = {layer: module_for(None, layer, spec, allow_pickle=allow_pickle)
               for layer, spec in specs.items() if spec != "from-attention"}
    plan = {**modules, **{layer: spec for layer, spec in specs.items() if spec == "from-attention"}}
    model, tokenizer = models.load_model(model_spec, revision=revision, lorsa=plan, **placement)
    modules.update({layer: module_for(model, layer, spec) for layer, spec in specs.items() if spec == "from-attention"})
    return model, tokenizer, modules


def load_with_modules(model_spec, lorsa_specs, mode, revision, base, allow_pickle, placement, heads=()):
    """(model, tokenizer, handle or None) for a plain model with --lorsa options, or a patched model. `heads` (head
    specs the command will use) are checked against the spliced layers before anything slow loads."""
    from lorsa_surgery.host.placement import dtype_of
    from lorsa_surgery.host.splicing import splice
    from lorsa_surgery.interventions.heads import layers_named
    from lorsa_surgery.publishing.patched import load_patched

    root = _patched_root(model_spec, revision)
    specs = parse_layer_specs(lorsa_specs, None if root is not None else model_spec, revision)
    if root is not None and specs:
        raise LorsaSurgeryError(
            f"{model_spec} is a patched model that brings its own Lorsa modules; --lorsa applies to a plain model "
            "(pass the base model instead, or leave --lorsa out)."
        )
    layers = sorted(specs) if root is None else sorted(int(layer) for layer in root["layers"])
    for spec in heads:
        missing = [layer for layer in layers_named(spec) if layer not in layers]
        if missing:
            where = f"spliced layers: {', '.join(map(str, layers))}" if layers else "pass --lorsa LAYER=PATH or a patched model"
            raise LorsaSurgeryError(f"{spec} names layer {missing[0]}, which carries no Lorsa module ({where}).")
    if root is not None:
        return load_patched(model_spec, revision=revision, base=base, mode=mode, **placement)
    model, tokenizer, modules = load_host(model_spec, specs, revision, allow_pickle, placement)
    if not modules:
        return model, tokenizer, None
    return model, tokenizer, splice(model, modules, mode=mode or "replace", dtype=dtype_of(placement["lorsa_dtype"]))


def _patched_root(spec: str, revision: str | None) -> dict | None:
    """The root config of the patched model a spec names (folder or Hub repo), or None for a plain model."""
    from lorsa_surgery.publishing.patched import is_patched_folder, read_root, shipped

    if is_patched_folder(spec):
        return read_root(spec)
    if Path(spec).exists():
        return None
    if (folder := shipped(spec)) is not None:
        return read_root(folder)
    path = _patched_repo_root(spec, revision)
    return None if path is None else read_root(Path(path).parent)


def _patched_repo_root(spec: str, revision: str | None) -> str | None:
    """The root file of a Hub id that names a patched model (from the Hub, or the cache when offline), or None."""
    from lorsa_surgery.host import models

    if models.resolve(spec)["kind"] != "hub":
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from lorsa_surgery.io.hub import HUB_FAILURES, hub_error
    from lorsa_surgery.publishing.patched import ROOT_FILE

    try:
        # A download, not file_exists: it answers from the cache under HF_HUB_OFFLINE=1, and the file is small
        # and needed anyway when it exists.
        return hf_hub_download(spec, ROOT_FILE, revision=revision)
    except EntryNotFoundError:  # a plain model repo
        return None
    except LocalEntryNotFoundError:  # offline and not cached: loading it as a plain model reports what is missing
        return None
    except HUB_FAILURES as err:  # an unknown repo, a refused token, an unreachable Hub: say so, once
        raise hub_error(f"Could not read Hub repo '{spec}'", err) from err

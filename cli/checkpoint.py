"""`lorsa-surgery inspect`: what a Lorsa checkpoint, or a patched-model folder, is."""

import json
import math

import click


def describe(lorsa) -> dict:
    """`lorsa_surgery.lorsa.formats.describe`, imported when `inspect` runs (it loads torch)."""
    from lorsa_surgery.lorsa.formats import describe as described

    return described(lorsa)


@click.command()
@click.argument("path")
@click.option("--revision", default=None, help="Hub revision when PATH is a repo id.")
@click.option("--allow-pickle", is_flag=True, help="Allow reading paper-era final.pth pickles (only from trusted sources).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(path: str, revision: str | None, allow_pickle: bool, as_json: bool) -> None:
    """Describe the Lorsa checkpoint at PATH (folder, Hub repo id, or repo_id:subfolder), or every module of a
    patched-model folder, with the labels of their head catalogs."""
    from lorsa_surgery.lorsa.model import Lorsa
    from lorsa_surgery.publishing.patched import is_patched_folder, module_folders, read_root

    if is_patched_folder(path):
        root = read_root(path)
        info = {
            "patched_model": {"base_model": root["base_model"], "mode": root["mode"], "adapter": root.get("adapter"),
                              "interventions": bool(root.get("interventions"))},
            "layers": {str(layer): describe(Lorsa.from_pretrained(folder)) for layer, folder in module_folders(path, root).items()},
        }
    else:
        info = describe(Lorsa.from_pretrained(path, allow_pickle=allow_pickle, revision=revision))
    if as_json:
        click.echo(json.dumps(_finite(info), indent=2, allow_nan=False))
        return
    if "patched_model" in info:
        _table(info["patched_model"])
        for layer, module in info["layers"].items():
            click.echo(f"\nlayer {layer}")
            _table(module)
    else:
        _table(info)


def _finite(value):
    """`value` with NaN and infinities as null: JSON has no such numbers, and a parser would reject the whole output."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _table(info: dict) -> None:
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if v is not None) or "-"
        click.echo(f"{key:>15}  {'-' if value is None else value}")

"""`lorsa-surgery inspect`: what a Lorsa checkpoint, or a patched-model folder, is."""

import json
from pathlib import Path

import click

from lorsa_surgery import Lorsa
from lorsa_surgery.formats import describe
from lorsa_surgery.patched import is_patched_folder, read_root


@click.command()
@click.argument("path")
@click.option("--revision", default=None, help="Hub revision when PATH is a repo id.")
@click.option("--allow-pickle", is_flag=True, help="Allow reading paper-era final.pth pickles (only from trusted sources).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(path: str, revision: str | None, allow_pickle: bool, as_json: bool) -> None:
    """Describe the Lorsa checkpoint at PATH (folder, Hub repo id, or repo_id:subfolder), or every module of a
    patched-model folder, with the labels of their head catalogs."""
    if is_patched_folder(path):
        root = read_root(path)
        info = {
            "patched_model": {"base_model": root["base_model"], "mode": root["mode"], "adapter": root.get("adapter"),
                              "interventions": bool(root.get("interventions"))},
            "layers": {layer: describe(Lorsa.from_pretrained(Path(path) / entry["folder"])) for layer, entry in root["layers"].items()},
        }
    else:
        info = describe(Lorsa.from_pretrained(path, allow_pickle=allow_pickle, revision=revision))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    if "patched_model" in info:
        _table(info["patched_model"])
        for layer, module in info["layers"].items():
            click.echo(f"\nlayer {layer}")
            _table(module)
    else:
        _table(info)


def _table(info: dict) -> None:
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if v is not None) or "-"
        click.echo(f"{key:>15}  {'-' if value is None else value}")

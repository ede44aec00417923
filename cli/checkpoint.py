"""`lorsa-surgery inspect`: what a Lorsa checkpoint is."""

import json

import click

from lorsa_surgery import Lorsa
from lorsa_surgery.formats import describe


@click.command()
@click.argument("path")
@click.option("--revision", default=None, help="Hub revision when PATH is a repo id.")
@click.option("--allow-pickle", is_flag=True, help="Allow reading paper-era final.pth pickles (only from trusted sources).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(path: str, revision: str | None, allow_pickle: bool, as_json: bool) -> None:
    """Describe the Lorsa checkpoint at PATH (folder, Hub repo id, or repo_id:subfolder)."""
    info = describe(Lorsa.from_pretrained(path, allow_pickle=allow_pickle, revision=revision))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if v is not None) or "-"
        click.echo(f"{key:>15}  {'-' if value is None else value}")

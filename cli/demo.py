"""`lorsa-surgery demo`: the whole story on the embedded SmolLM2, in one HTML report."""

from pathlib import Path

import click


@click.command()
@click.option("--fast", is_flag=True, help="Few prompts and tiny training runs: under 2 minutes (for tests).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("lorsa-demo"), show_default=True,
              help="Folder for report.html, report.md, results.json and the patched model.")
@click.option("--fresh", is_flag=True, help="Redo every step instead of reusing the cached results.")
def demo(fast, out, fresh):
    """Splice, measure the complete replacement, find head families, ablate, steer, patch, classify
    positional/symbolic heads and publish, on the embedded SmolLM2; writes a self-contained HTML report with every
    number measured (or labelled as recorded in the shipped model)."""
    from lorsa_surgery.demo.report import run_demo

    report = run_demo(out, fast=fast, fresh=fresh)
    click.echo((out / "report.md").read_text(encoding="utf-8"))
    click.echo(f"Report: {report}")

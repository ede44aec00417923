"""`lorsa-surgery heads export`: a head scan as a Neuronpedia bundle or a HeadVis tree; the naming options are
`ExportConfig` fields."""

from pathlib import Path

import click

from lorsa_surgery.analysis.config import FORMATS, ExportConfig
from lorsa_surgery.cli.config import config_options
from lorsa_surgery.cli.heads import heads
from lorsa_surgery.cli.loading import overwrite_option


@heads.command("export", context_settings={"max_content_width": 120})
@click.argument("scan_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "format_", type=click.Choice(FORMATS), required=True,
              help="neuronpedia: its import bundle, one Lorsa feature per head with z-patterns; headvis: per-head "
                   "JSON of each QK group (each MHSA head, for a scan of an exact copy).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@config_options(ExportConfig)
@overwrite_option
def export(scan_dir, format_, out_dir, overwrite, **options):
    """Export the scan in SCAN_DIR (`heads scan --out`) for Neuronpedia or HeadVis."""
    from lorsa_surgery.analysis.export import export_scan

    result = export_scan(scan_dir, format_, out_dir, overwrite=overwrite, config=ExportConfig(**options))
    click.echo(f"{result.out}: " + ", ".join(f"{n} {what}" for what, n in result.counts.items()))
